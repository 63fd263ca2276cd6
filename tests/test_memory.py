"""Neither backend allocates anything of size rows × T × V, in the forward or the backward.

A dispatch mode sees every tensor that any aten op creates (the launchers' buffers, the torch backend's
chunks, autograd's gradients) and records the largest in bytes. The naive full-logits path must trip the same
detector, so the test can fail.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from alphadpo_kernels import LogpsOptions, fused_alpha_dpo_loss, reference_sequence_logps
from helpers import make_inputs


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


ROWS, SEQ, HDIM, VOCAB = 4, 96, 8, 1000
BUDGET = LogpsOptions(memory_budget_mb=0.05, fwd_block_m=16, fwd_block_n=128, fwd_block_k=16,
                      bwd_block_m=16, bwd_block_n=128, bwd_block_k=16)


def _largest(fn):
    hidden, weight, labels, _ = make_inputs(rows=ROWS, seq=SEQ, hdim=HDIM, vocab=VOCAB, seed=3)
    hidden.requires_grad_(), weight.requires_grad_()
    with LargestTensor() as mode:
        loss = fn(hidden, weight, labels)
        loss.backward()
    return mode.nbytes


def _fused(backend):
    def run(hidden, weight, labels):
        return fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=torch.full((ROWS // 2,), -3.0),
                                    ref_rejected_logps=torch.full((ROWS // 2,), -3.0), backend=backend,
                                    options=BUDGET).loss
    return run


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_never_allocates_rows_t_v(backend):
    full = ROWS * SEQ * VOCAB * 4
    largest = _largest(_fused(backend))
    # The largest tensor is a gradient (V × H or tokens × H) or the torch backend's logit chunk, whose size
    # the memory budget fixes whatever T is; all far below the logits.
    budget = int(BUDGET.memory_budget_mb * 2**20)
    assert largest <= max(VOCAB * HDIM * 4, ROWS * SEQ * HDIM * 4, budget), largest
    assert largest < full / 20


def test_detector_sees_the_naive_logits():
    largest = _largest(lambda h, w, y: reference_sequence_logps(h, w, y, compute_dtype=None).sum())
    assert largest >= ROWS * SEQ * VOCAB * 4
