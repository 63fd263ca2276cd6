"""Real compilation on a CUDA device: the shipped block sizes at a realistic head, bf16 and fp32.

Skipped without a GPU; run by benchmarks/gpu_check.sh on the GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from alphadpo_kernels import LogpsOptions, fused_alpha_dpo_loss, fused_sequence_logps
from conftest import rel_err
from helpers import check_against_fp64, make_inputs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,logp_tol,grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-4, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
def test_shipped_blocks_at_a_real_head(dtype, logp_tol, grad_tol, softcap):
    hidden, weight, labels, bias = make_inputs(rows=4, seq=301, hdim=4096, vocab=32003, dtype=dtype, bias=True,
                                               seed=5, device="cuda", logit_scale=4.0)
    check_against_fp64(hidden, weight, labels, bias, logp_tol=logp_tol, grad_tol=grad_tol, softcap=softcap,
                       shift=True, backend="triton", options=LogpsOptions())


def test_triton_and_torch_backends_agree_on_cuda():
    hidden, weight, labels, _ = make_inputs(rows=4, seq=257, hdim=1024, vocab=50001, dtype=torch.bfloat16,
                                            seed=9, device="cuda")
    kw = dict(ref_chosen_logps=torch.full((2,), -2.0, device="cuda"),
              ref_rejected_logps=torch.full((2,), -2.5, device="cuda"),
              margin_mean=torch.tensor([0.1], device="cuda"), margin_std=torch.tensor([0.4], device="cuda"))
    results = []
    for backend in ("triton", "torch"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_alpha_dpo_loss(h, w, labels, backend=backend, **kw).loss
        results.append((loss, *torch.autograd.grad(loss, [h, w])))
    assert rel_err(results[0][0], results[1][0]) < 2e-3
    assert rel_err(results[0][1], results[1][1]) < 2e-2 and rel_err(results[0][2], results[1][2]) < 2e-2


def test_memory_stays_near_the_floor():
    """Peak above inputs for policy fwd+bwd at a Llama-3 head: the floor (bf16 dH + dW) plus the backward's
    float32 buffers (dH, one vocabulary chunk of dW) and nothing of size tokens × V.

    (SPEC §4's 1.15× is the tuning issue's target, measured by the benchmark.)"""
    hidden, weight, labels, _ = make_inputs(rows=2, seq=4096, hdim=4096, vocab=128256, dtype=torch.bfloat16,
                                            seed=11, device="cuda")
    hidden.requires_grad_(), weight.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_sequence_logps(hidden, weight, labels, backend="triton", check_values=False).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    floor = (hidden.numel() + weight.numel()) * 2
    n_tok, hdim = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
    fp32_buffers = 4 * hdim * (n_tok + LogpsOptions().bwd_vocab_rows(weight.shape[0], hdim))
    full_logits = n_tok * weight.shape[0] * 4
    assert peak <= floor + fp32_buffers + 64 * 2**20 < full_logits
