"""Non-tensor options of the sequence log-prob op, carried through autograd as one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# Backward tile skipping (opt-in, filter_eps="auto"): a vocabulary tile whose softmax entries are all below
# this (and that holds no target) is left out of dH / dW. The values sit 2⁻⁵ below half an ulp of 1 in the
# dtype, as Cut Cross-Entropy's filter does for bf16; float32 is never filtered.
AUTO_FILTER_EPS = {torch.bfloat16: 2.0**-12, torch.float16: 2.0**-15, torch.float32: None}

MemoryMode = Literal["fast", "lean"]
MEMORY_MODES = ("fast", "lean")

# Scratch the backward may use besides the gradients (and, in "fast" mode, its one float32 accumulator):
# the dz chunk, the cuBLAS producer's float32 logits chunk, per-chunk partial sums. The memory bounds allow 64 MB (docs/design.md §3).
DEFAULT_BUDGET_BYTES = 64 * 2**20
# "lean" promises at most 1.1 × the gradients: its scratch is also held to 1/16 of them (small heads),
# but never below this, so that chunks stay wide enough for the GEMMs to run at speed.
LEAN_MIN_BUDGET_BYTES = 2**20


# Each Triton kernel owns its launch configuration: the forward (fwd_*) and the backward's dz producer (bwd_*,
# also the opt-in tile-skipping kernel, within its caps) are tuned and timed separately.
FWD_FIELDS = ("fwd_block_m", "fwd_block_n", "fwd_block_k", "fwd_num_warps", "fwd_num_stages", "fwd_group_m")
BWD_FIELDS = ("bwd_block_m", "bwd_block_n", "bwd_block_k", "bwd_num_warps", "bwd_num_stages", "bwd_group_m")
BLOCK_FIELDS = FWD_FIELDS + BWD_FIELDS
TILE_FIELDS = ("fwd_block_m", "fwd_block_n", "fwd_block_k", "bwd_block_m", "bwd_block_n", "bwd_block_k")


@dataclass(frozen=True)
class LogpsOptions:
    """Options shared by every backend.

    Memory of the backward (docs/design.md §3):

    * ``memory="fast"`` (default): 4 GEMM units for forward + backward. One float32 accumulator, for ``dH``
      (vocabulary-chunk outer) or for ``dW`` (token-chunk outer), whichever is smaller: peak ≈ gradients +
      ``4·min(N, V)·H`` + ``memory_budget_mb``.
    * ``memory="lean"``: 5 GEMM units. One pass for ``dW`` (vocabulary-chunk outer, each chunk one GEMM over all
      tokens written once in the weight's dtype) and one for ``dH`` (token-chunk outer, a float32 accumulator
      per token chunk only): peak ≈ gradients + ``memory_budget_mb`` (≤ 1.1 × the gradients).

    ``memory_budget_mb`` bounds that scratch (default 64 MB; in ``lean`` also at most 1/16 of the gradients)
    and the torch backend's forward temporaries; ``chunk_tokens`` / ``chunk_vocab`` override the chunk sizes
    derived from it.

    ``fwd_*`` / ``bwd_*`` configure the Triton forward kernel and the backward's ``dz`` kernel separately: tile
    sizes ``*_block_m/n/k`` (powers of two, at least 16), ``*_num_warps``, ``*_num_stages`` and ``*_group_m`` (row
    blocks that sweep the vocabulary together, so weight tiles are re-read from L2 rather than HBM).
    ``fwd_splits`` is the number of vocabulary splits of the forward grid (None: enough for the group to fill the
    card, see ``triton_forward.py``). Left at None they come from ``benchmarks/autotune.py``'s cache for this card
    and shape, else from the architecture's compile-checked starting point (``tuning.ARCH_DEFAULTS``).
    """

    softcap: float | None = None
    logit_scale: float = 1.0
    memory: MemoryMode = "fast"
    fwd_block_m: int | None = None
    fwd_block_n: int | None = None
    fwd_block_k: int | None = None
    fwd_num_warps: int | None = None
    fwd_num_stages: int | None = None
    fwd_group_m: int | None = None
    fwd_splits: int | None = None
    bwd_block_m: int | None = None
    bwd_block_n: int | None = None
    bwd_block_k: int | None = None
    bwd_num_warps: int | None = None
    bwd_num_stages: int | None = None
    bwd_group_m: int | None = None
    memory_budget_mb: float | None = None
    chunk_tokens: int | None = None
    chunk_vocab: int | None = None
    filter_eps: float | str | None = None
    use_extension: bool = True

    def __post_init__(self) -> None:
        for name in TILE_FIELDS:
            v = getattr(self, name)
            if v is not None and (v < 16 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")
        for name in ("fwd_num_warps", "bwd_num_warps"):
            v = getattr(self, name)
            if v is not None and (v < 1 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two or None, got {v}")
        for name in ("fwd_num_stages", "bwd_num_stages", "fwd_group_m", "bwd_group_m", "fwd_splits"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {v}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        for name in ("chunk_tokens", "chunk_vocab"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {v}")
        if isinstance(self.filter_eps, str) and self.filter_eps != "auto":
            raise ValueError(f"filter_eps must be 'auto', a number in [0, 1) or None, got {self.filter_eps!r}")
        if isinstance(self.filter_eps, (int, float)) and not 0 <= self.filter_eps < 1:
            raise ValueError(f"filter_eps must be 'auto', a number in [0, 1) or None, got {self.filter_eps!r}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be positive, got {self.memory_budget_mb}")

    def budget_bytes(self, gradient_bytes: int | None = None) -> int:
        """Scratch budget in bytes. ``gradient_bytes`` (dH + dW) caps the lean mode's default."""
        if self.memory_budget_mb is not None:
            return int(self.memory_budget_mb * 2**20)
        if self.memory == "lean" and gradient_bytes:
            return max(LEAN_MIN_BUDGET_BYTES, min(DEFAULT_BUDGET_BYTES, gradient_bytes // 16))
        return DEFAULT_BUDGET_BYTES

    @property
    def blocks_resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in BLOCK_FIELDS)

    def filter_threshold(self, dtype: torch.dtype) -> float | None:
        """The backward skip threshold for inputs of ``dtype`` (None: no skipping)."""
        eps = AUTO_FILTER_EPS.get(dtype) if self.filter_eps == "auto" else self.filter_eps
        return eps if eps else None
