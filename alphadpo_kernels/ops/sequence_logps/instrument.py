"""Opt-in accounting of the GEMM work a call issues, so tests can hold each path to its plan (docs/design.md §4), and of
the host synchronisations it makes (:func:`count_host_syncs`).

Every GEMM of the chunked paths (torch / cuBLAS through :mod:`.gemm`, and each Triton launch by its logical
``[m, n, k]`` extent) calls :func:`record_gemm`; it costs one global read unless a :func:`count_gemm_work`
block is active.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


# ----------------------------------------------------------------------------------------------- host syncs


@dataclass
class SyncLog:
    """What a :func:`count_host_syncs` block saw: ``ops``, one name per device→host synchronisation, in order."""

    ops: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ops)


def _is_bool_index(t) -> bool:
    return t is not None and getattr(t, "dtype", None) in (torch.bool, torch.uint8)


def _host_copy(src, dst_device, non_blocking) -> str | None:
    """``"(to cpu)"`` / ``"(from cpu)"`` for a blocking copy between the CPU and an accelerator (CUDA, or a fake
    CUDA tensor): torch copies either way with ``cudaMemcpyAsync`` then synchronises the stream."""
    src_dev = getattr(src, "device", None)
    if src_dev is None or dst_device is None or non_blocking:
        return None
    src_type, dst_type = src_dev.type, torch.device(dst_device).type
    if "meta" in (src_type, dst_type) or (src_type == "cpu") == (dst_type == "cpu"):
        return None
    return "(to cpu)" if dst_type == "cpu" else "(from cpu)"


def _sync_reason(func, args, kwargs) -> str | None:
    """The op's name when, on a CUDA tensor, it makes the host wait for the device; None otherwise."""
    packet = func.overloadpacket.__name__
    name = f"aten.{packet}.{func._overloadname}"
    if packet in _ALWAYS_SYNC:
        return name
    if packet == "histc":  # without a range (min == max) it reads the data's min and max first
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return name if lo == hi else None
    if packet == "repeat_interleave":  # the Tensor overloads size their output from the repeats' sum
        return name if func._overloadname != "self_int" and kwargs.get("output_size") is None else None
    if packet == "index":  # boolean-mask indexing: the mask's nonzero() sizes the result
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return f"{name}(bool mask)" if any(_is_bool_index(i) for i in indices) else None
    if packet in ("index_put_", "index_put", "_index_put_impl_", "_unsafe_index_put"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return f"{name}(bool mask)" if any(_is_bool_index(i) for i in indices) else None
    if packet == "_to_copy":
        where = _host_copy(args[0], kwargs.get("device"), kwargs.get("non_blocking", False))
        return name + where if where else None
    if packet == "copy_":
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        dst, src = args[0], args[1]
        where = _host_copy(src, dst.device, non_blocking) if isinstance(src, torch.Tensor) else None
        return name + where if where else None
    return None


# ops whose every call reads device memory on the host: a scalar out (item / bool / int / equal / allclose), or
# an output sized by the data (nonzero, masked_select, unique*, bincount)
_ALWAYS_SYNC = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "allclose",
})


class _SyncCounter(TorchDispatchMode):
    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            self.log.ops.append(reason)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs():
    """Count the aten ops of the enclosed block that make the host wait for a CUDA device::

        with count_host_syncs() as log:
            ...
        assert log.count == 1, log.ops   # log.ops: the ops' names, in order

    It works on CPU tensors (a test without a GPU counts what the same calls would cost on CUDA) and nested inside
    other dispatch modes (enter it *inside* ``FakeTensorMode`` to dry-run CUDA code on fake tensors). Counted:
    ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``if t:``, ``int(t)``, ``float(t)``), ``nonzero``
    (``argwhere``, one-argument ``where``), ``masked_select``, boolean-mask ``index`` / ``index_put_``,
    ``repeat_interleave`` of a repeats tensor without ``output_size``, ``unique*``, ``equal``, ``allclose``,
    ``is_nonzero``, ``bincount``, ``histc`` without a range, and blocking copies between the CPU and an
    accelerator, which torch follows with a stream synchronisation either way (``.cpu()``, ``.tolist()``,
    ``.to("cpu")``, ``cpu_tensor.copy_(cuda_tensor)``; ``torch.tensor(x, device="cuda")``, ``.to("cuda")``);
    ``non_blocking=True`` copies are not counted. Copies are only seen on CUDA (or fake CUDA) tensors: on CPU
    tensors ``.tolist()``, ``.cpu()`` or ``torch.tensor(x)`` dispatch no device-changing op. Ops run inside a
    kernel's own implementation (below the dispatcher) are not seen; what the caller asked for is. The autograd
    engine carries the mode into ``backward()``, so a backward run inside the block is counted too.
    """
    log = SyncLog()
    with _SyncCounter(log):
        yield log
