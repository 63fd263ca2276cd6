"""Opt-in accounting of the GEMM work a call issues, so tests can hold each path to its plan (SPEC §5).

Every GEMM of the chunked paths (torch / cuBLAS through :mod:`.gemm`, and each Triton launch by its logical
``[m, n, k]`` extent) calls :func:`record_gemm`; it costs one global read unless a :func:`count_gemm_work`
block is active.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

_active: list["GemmLog"] = []


@dataclass
class GemmLog:
    calls: list[tuple[str, int, int, int]] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return sum(2 * m * n * k for _, m, n, k in self.calls)

    def flops_of(self, prefix: str) -> int:
        return sum(2 * m * n * k for kind, m, n, k in self.calls if kind.startswith(prefix))


def record_gemm(kind: str, m: int, n: int, k: int) -> None:
    if _active:
        _active[-1].calls.append((kind, int(m), int(n), int(k)))


@contextlib.contextmanager
def count_gemm_work():
    log = GemmLog()
    _active.append(log)
    try:
        yield log
    finally:
        _active.remove(log)
