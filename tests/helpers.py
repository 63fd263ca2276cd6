"""Input builders shared by the tests."""

from __future__ import annotations

import math

import torch

from alphadpo_kernels import LogpsOptions

# Small tiles so that the odd test shapes exercise every tail: V = 123 is not a multiple of 32, H = 40 not of 16.
SMALL_BLOCKS = LogpsOptions(fwd_block_m=16, fwd_block_n=32, fwd_block_k=16,
                            bwd_block_m=16, bwd_block_n=32, bwd_block_k=16, group_m=2,
                            chunk_tokens=7, chunk_vocab=50, bwd_vocab_chunk=64)


def make_inputs(rows=4, seq=23, hdim=40, vocab=123, dtype=torch.float32, *, bias=False, seed=0,
                device="cpu", logit_scale=2.0, ignore_index=-100):
    """Random hidden/head/labels with masked prompt prefixes of varying length and right padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq, hdim, generator=g)
    weight = torch.randn(vocab, hdim, generator=g) * (logit_scale / math.sqrt(hdim))
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    for r in range(rows):
        prompt = int(torch.randint(1, seq // 2, (1,), generator=g))
        labels[r, :prompt] = ignore_index
        if r % 2 == 1:  # right padding on every other row
            pad = int(torch.randint(1, seq // 4 + 1, (1,), generator=g))
            labels[r, seq - pad:] = ignore_index
    to = dict(device=device, dtype=dtype)
    return (hidden.to(**to), weight.to(**to), labels.to(device), b.to(**to) if b is not None else None)
