"""On a CUDA device: real compilation of the shipped block sizes, both memory modes and all three backends at a
realistic head, and the memory bounds of docs/design.md §3 with the caching allocator's own peak.

Skipped without a GPU; run by benchmarks/gpu_check.sh on the GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from alphadpo_kernels import LogpsOptions, backends, fused_alpha_dpo_loss, fused_sequence_logps
from conftest import rel_err
from helpers import check_against_fp64, make_inputs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("memory", ["fast", "lean"])
@pytest.mark.parametrize("dtype,logp_tol,grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-4, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
def test_shipped_blocks_at_a_real_head(dtype, logp_tol, grad_tol, softcap, memory):
    hidden, weight, labels, bias = make_inputs(rows=4, seq=301, hdim=4096, vocab=32003, dtype=dtype, bias=True,
                                               seed=5, device="cuda", logit_scale=4.0)
    check_against_fp64(hidden, weight, labels, bias, logp_tol=logp_tol, grad_tol=grad_tol, softcap=softcap,
                       shift=True, backend="triton", options=LogpsOptions(memory=memory))


def test_backends_agree_on_cuda():
    hidden, weight, labels, _ = make_inputs(rows=4, seq=257, hdim=1024, vocab=50001, dtype=torch.bfloat16,
                                            seed=9, device="cuda")
    kw = dict(ref_chosen_logps=torch.full((2,), -2.0, device="cuda"),
              ref_rejected_logps=torch.full((2,), -2.5, device="cuda"),
              margin_mean=torch.tensor([0.1], device="cuda"), margin_std=torch.tensor([0.4], device="cuda"))
    names = ["triton", "torch"] + (["cublas"] if backends()["cublas"] else [])
    results = []
    for backend in names:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_alpha_dpo_loss(h, w, labels, backend=backend, **kw).loss
        results.append((loss, *torch.autograd.grad(loss, [h, w])))
    for other in results[1:]:
        assert rel_err(results[0][0], other[0]) < 2e-3
        assert rel_err(results[0][1], other[1]) < 2e-2 and rel_err(results[0][2], other[2]) < 2e-2


def _peak_above_inputs(memory, n_tok, vocab=128256, hdim=4096, backend="triton"):
    hidden, weight, labels, _ = make_inputs(rows=2, seq=n_tok // 2, hdim=hdim, vocab=vocab, dtype=torch.bfloat16,
                                            seed=11, device="cuda")
    labels = torch.randint(0, vocab, labels.shape, device="cuda")  # every token live, as in the benchmark
    hidden.requires_grad_(), weight.requires_grad_()
    opts = LogpsOptions(memory=memory)
    fused_sequence_logps(hidden, weight, labels, backend=backend, options=opts).sum().backward()  # warm-up
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_sequence_logps(hidden, weight, labels, backend=backend, check_values=False, options=opts).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    floor = (hidden.numel() + weight.numel()) * 2
    return peak, floor


@pytest.mark.parametrize("n_tok", [8192, 16384])
def test_fast_memory_bound(n_tok):
    """docs/design.md §3: fast ≤ floor + 4·min(N, V)·H + 64 MB."""
    peak, floor = _peak_above_inputs("fast", n_tok)
    assert peak <= floor + 4 * min(n_tok, 128256) * 4096 + 64 * 2**20, peak / floor


@pytest.mark.parametrize("n_tok", [8192, 16384, 65536])
def test_lean_memory_bound(n_tok):
    """docs/design.md §3: lean ≤ 1.10 × floor at every N."""
    peak, floor = _peak_above_inputs("lean", n_tok)
    assert peak <= 1.10 * floor, peak / floor


def test_float32_accumulating_gemms_are_native():
    """torch's out_dtype GEMMs are there (else the slower blocked fallback of gemm.py runs)."""
    from alphadpo_kernels.ops.sequence_logps import gemm

    assert gemm._cuda_has("mm")
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 9):
        assert gemm._cuda_has("addmm")
