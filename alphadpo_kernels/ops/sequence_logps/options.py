"""Non-tensor options of the sequence log-prob op, carried through autograd as one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Backward tile skipping (opt-in, filter_eps="auto"): a vocabulary tile whose softmax entries are all below
# this (and that holds no target) is left out of dH / dW. The values sit 2⁻⁵ below half an ulp of 1 in the
# dtype, as Cut Cross-Entropy's filter does for bf16; float32 is never filtered.
AUTO_FILTER_EPS = {torch.bfloat16: 2.0**-12, torch.float16: 2.0**-15, torch.float32: None}


@dataclass(frozen=True)
class LogpsOptions:
    """Options shared by every backend.

    ``block_*`` size the Triton tiles (powers of two, at least 16); ``memory_budget_mb`` bounds the
    temporaries of the torch backend (logits chunk, upcast weight chunk); ``chunk_tokens`` /
    ``chunk_vocab`` override the chunk sizes it derives from the budget.
    """

    softcap: float | None = None
    fwd_block_m: int = 64
    fwd_block_n: int = 128
    fwd_block_k: int = 64
    bwd_block_m: int = 64
    bwd_block_n: int = 128
    bwd_block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    memory_budget_mb: float | None = None
    chunk_tokens: int | None = None
    chunk_vocab: int | None = None
    bwd_vocab_chunk: int | None = None
    filter_eps: float | str | None = None
    use_extension: bool = True

    def __post_init__(self) -> None:
        for name in ("fwd_block_m", "fwd_block_n", "fwd_block_k", "bwd_block_m", "bwd_block_n", "bwd_block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")
        for name in ("chunk_tokens", "chunk_vocab", "bwd_vocab_chunk"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {v}")
        if isinstance(self.filter_eps, str) and self.filter_eps != "auto":
            raise ValueError(f"filter_eps must be 'auto', a number in [0, 1) or None, got {self.filter_eps!r}")
        if isinstance(self.filter_eps, (int, float)) and not 0 <= self.filter_eps < 1:
            raise ValueError(f"filter_eps must be 'auto', a number in [0, 1) or None, got {self.filter_eps!r}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be positive, got {self.memory_budget_mb}")

    def torch_budget_bytes(self, vocab: int, hdim: int) -> int:
        if self.memory_budget_mb is not None:
            return int(self.memory_budget_mb * 2**20)
        return max(16 * 2**20, vocab * hdim * 4 // 8)

    def bwd_vocab_rows(self, vocab: int, hdim: int) -> int:
        """Rows per backward launch, a multiple of ``bwd_block_n``."""
        rows = self.bwd_vocab_chunk or max(64 * 2**20 // (4 * hdim), vocab // 8)
        rows = -(-rows // self.bwd_block_n) * self.bwd_block_n
        return min(rows, -(-vocab // self.bwd_block_n) * self.bwd_block_n)

    def filter_threshold(self, dtype: torch.dtype) -> float | None:
        """The backward skip threshold for inputs of ``dtype`` (None: no skipping)."""
        eps = AUTO_FILTER_EPS.get(dtype) if self.filter_eps == "auto" else self.filter_eps
        return eps if eps else None
