"""The chunked GEMM backward (chunked_backward.py): every plan, every producer, against the fp64 reference.

Plans: ``vocab-outer`` (fast, N ≤ V), ``token-outer`` (fast, N > V), ``two-pass`` (lean, or one gradient).
Producers: the Triton ``dz`` kernel (interpreter), the torch epilogue (float32 dz), and the cuBLAS path run on
CPU tensors with its CUDA-only epilogue replaced by the torch twin (helpers.cublas_on_cpu). Small chunk sizes
make every plan take several chunks and a ragged last one; masked prompts and padding make it gather rows.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from alphadpo_kernels import LogpsOptions, fused_sequence_logps, reference_sequence_logps
from alphadpo_kernels.ops.sequence_logps.chunked_backward import plan_backward
from conftest import rel_err
from helpers import check_against_fp64, cublas_on_cpu, make_inputs

BLOCKS = LogpsOptions(fwd_block_m=16, fwd_block_n=32, fwd_block_k=16, bwd_block_m=16, bwd_block_n=32,
                      bwd_block_k=16, bwd_group_m=2, chunk_tokens=13, chunk_vocab=29)
SHAPES = {"vocab-outer": dict(vocab=123), "token-outer": dict(vocab=37)}  # ~60 live tokens of 92
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-4, 2e-2)}


@pytest.fixture(params=["torch", "triton", "cublas"])
def backend(request, monkeypatch):
    if request.param == "cublas":
        cublas_on_cpu(monkeypatch)
    return request.param


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("memory", ["fast", "lean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_plan_matches_fp64(backend, memory, dtype, shape):
    seed = zlib.crc32(f"{backend}-{memory}-{dtype}-{shape}".encode()) % 10_000
    hidden, weight, labels, bias = make_inputs(dtype=dtype, bias=True, seed=seed, **SHAPES[shape])
    n_live = int((labels[:, 1:] != -100).sum())
    expected = {"lean": "two-pass", "fast": shape}[memory]
    assert plan_backward(n_live, labels.numel(), weight.shape[0], hidden.shape[-1], 2, 2.0,
                         dataclasses.replace(BLOCKS, memory=memory), True, True, True).order == expected
    logp_tol, grad_tol = TOL[dtype]
    check_against_fp64(hidden, weight, labels, bias, logp_tol=logp_tol, grad_tol=grad_tol, softcap=3.0, shift=True,
                       backend=backend, options=dataclasses.replace(BLOCKS, memory=memory))


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_all_live_strided_hidden_is_read_in_place(backend, memory):
    """No masked token: the hidden states are used where they lie (a strided view here), not gathered; float32
    accumulates straight into dH."""
    hidden, weight, labels, _ = make_inputs(rows=2, seq=21, vocab=53, seed=41)
    labels = torch.randint(0, 53, labels.shape, generator=torch.Generator().manual_seed(1))
    wide = torch.randn(2, 21, hidden.shape[-1] + 5)
    wide[..., : hidden.shape[-1]] = hidden
    view = wide[..., : hidden.shape[-1]]
    assert not view.is_contiguous()
    check_against_fp64(view, weight.clone(), labels, backend=backend, options=dataclasses.replace(BLOCKS, memory=memory))


@pytest.mark.parametrize("frozen", ["hidden", "weight", "bias_only"])
@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_one_gradient_at_a_time(backend, memory, frozen):
    hidden, weight, labels, bias = make_inputs(bias=True, seed=43)
    hidden.requires_grad_(frozen == "weight")
    weight.requires_grad_(frozen == "hidden")
    bias.requires_grad_(frozen != "weight")
    leaves = [t for t in (hidden, weight, bias) if t.requires_grad]
    out = fused_sequence_logps(hidden, weight, labels, bias=bias, backend=backend,
                               options=dataclasses.replace(BLOCKS, memory=memory))
    grads = torch.autograd.grad(out.sum(), leaves)
    l64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (hidden, weight, bias)]
    ref = reference_sequence_logps(l64[0], l64[1], labels, bias=l64[2])
    ref_grads = torch.autograd.grad(ref.sum(), [t for t in l64 if t.requires_grad])
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_garbage_in_dead_rows_never_reaches_a_gemm(backend, memory, shape):
    """NaN / inf in prompt and padding rows: finite, identical gradients and exact zeros in their dH rows."""
    hidden, weight, labels, _ = make_inputs(seed=47, **SHAPES[shape])
    dead = labels == -100
    dirty = hidden.clone()
    dirty[dead] = float("nan")
    dirty[0, 0] = float("inf")
    opts = dataclasses.replace(BLOCKS, memory=memory)
    results = []
    for h in (hidden, dirty):
        h, w = h.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_sequence_logps(h, w, labels, backend=backend, options=opts)
        results.append((out, *torch.autograd.grad(out.sum(), [h, w])))
    for a, b in zip(*results):
        assert torch.isfinite(b).all() and rel_err(b, a) < 1e-6
    assert (results[1][1][dead] == 0).all()


def test_gradients_are_deterministic(backend):
    """No atomics: two runs give bit-identical gradients (and so a resumed run on a GPU too)."""
    hidden, weight, labels, bias = make_inputs(dtype=torch.bfloat16, bias=True, seed=53)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = fused_sequence_logps(leaves[0], leaves[1], labels, bias=leaves[2], backend=backend, options=BLOCKS)
        runs.append(torch.autograd.grad(out.sum(), leaves))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_default_chunks_cover_a_small_head_at_once():
    plan = plan_backward(60, 92, 123, 40, 2, 2.0, LogpsOptions(), True, True, False)
    assert plan.order == "vocab-outer" and plan.vocab_chunk == 123 and plan.budget == 64 * 2**20
    lean = plan_backward(60, 92, 123, 40, 2, 2.0, LogpsOptions(memory="lean"), True, True, False)
    assert lean.passes == ("vocab", "token") and lean.budget == 2**20  # floor / 16, at least 1 MB
    assert plan_backward(60, 92, 123, 40, 2, 2.0, LogpsOptions(), True, False, False).passes == ("token",)
    assert plan_backward(60, 92, 123, 40, 2, 2.0, LogpsOptions(), False, True, True).passes == ("vocab",)
    assert plan_backward(60, 92, 123, 40, 2, 2.0, LogpsOptions(), False, False, True).passes == ("vocab",)


def test_bad_memory_mode():
    with pytest.raises(ValueError, match="memory must be one of"):
        LogpsOptions(memory="small")


@pytest.mark.parametrize("api", ["legacy", "new"])
def test_exact_matmul_overrides_and_restores_the_process_cublas_settings(api):
    """TF32, split-K reduced-precision reductions and fp16 accumulation are off inside the backward's GEMMs and
    come back exactly as the user set them, through whichever TF32 API the user used (reading the legacy flag
    after the new API was used raises in torch ≥ 2.9)."""
    from alphadpo_kernels.ops.sequence_logps.gemm import exact_matmul

    m = torch.backends.cuda.matmul

    def state():
        return (m.fp32_precision, torch._C._get_cublas_allow_bf16_reduced_precision_reduction(),
                torch._C._get_cublas_allow_fp16_reduced_precision_reduction(), m.allow_fp16_accumulation)

    original = state()
    try:
        if api == "legacy":
            m.allow_tf32 = True
            m.allow_fp16_accumulation = True
        else:
            m.fp32_precision = "tf32"
            torch._C._set_cublas_allow_bf16_reduced_precision_reduction(False, False)  # split-K off too
        before = state()
        with exact_matmul(torch.device("cuda")):
            inside = state()
        assert state() == before
        assert inside[0] == "ieee" and not inside[1][0] and not inside[2][0] and inside[3] is False
    finally:
        m.fp32_precision = original[0]
        torch._C._set_cublas_allow_bf16_reduced_precision_reduction(*original[1])
        torch._C._set_cublas_allow_fp16_reduced_precision_reduction(*original[2])
        m.allow_fp16_accumulation = original[3]
