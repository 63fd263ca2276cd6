"""Memory of the op, proven on the CPU (docs/design.md §3): the allocation plan, not the device, decides it.

Two dispatch modes watch every tensor any aten op creates inside the call:
* ``LargestTensor``: nothing of size ``rows × T × V`` is ever allocated (and it does catch the naive path);
* ``LiveBytes``: the peak of live allocated bytes during the backward, the CPU twin of
  ``torch.cuda.max_memory_allocated`` above the start, held to the bound (docs/design.md §3) of each memory mode at the
  Llama-3-8B head's proportions scaled down by 32 (H = 128, V = 4008; the 64 MB budget scales by 32²).

CPU-only stand-ins for work that allocates nothing on a GPU are left out of ``LiveBytes``: the Triton
interpreter's host copies inside a launch, and the float32 upcast blocks that replace cuBLAS' ``out_dtype`` GEMMs
(the CPU has none).
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from alphadpo_kernels import LogpsOptions, fused_alpha_dpo_loss, fused_sequence_logps, reference_sequence_logps
from alphadpo_kernels.ops.sequence_logps import gemm, triton_grad_logits
from alphadpo_kernels.ops.sequence_logps.chunked_backward import plan_backward
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


class LiveBytes(TorchDispatchMode):
    """Peak of live bytes of the storages allocated inside the block.

    An op output whose storage is new (not one of the op's inputs') is an allocation; it stays live while any
    tensor seen on that storage (views, in-place results) is alive. Storages that existed before the block are
    never counted.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}

    def _release(self, key):
        entry = self._refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self._refs.get(key)
            if entry is None:
                if key in inputs:
                    continue
                entry = self._refs[key] = [0, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out


class _Untracked:
    """A Triton kernel whose launches run with the dispatch modes off (the interpreter's host copies)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with _disable_current_modes():
                return launch(*args, **kwargs)
        return run


@pytest.fixture
def gpu_allocations_only(monkeypatch):
    monkeypatch.setattr(triton_grad_logits, "_grad_logits_kernel", _Untracked(triton_grad_logits._grad_logits_kernel))
    real = gemm._upcast_into

    def upcast(*args, **kwargs):
        with _disable_current_modes():
            return real(*args, **kwargs)
    monkeypatch.setattr(gemm, "_upcast_into", upcast)


# ------------------------------------------------------------------------------------------------ rows × T × V

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


def _fused(backend, memory):
    def run(hidden, weight, labels):
        return fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=torch.full((ROWS // 2,), -3.0),
                                    ref_rejected_logps=torch.full((ROWS // 2,), -3.0), backend=backend,
                                    options=dataclasses.replace(BUDGET, memory=memory)).loss
    return run


@pytest.mark.parametrize("memory", ["fast", "lean"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_never_allocates_rows_t_v(backend, memory):
    full = ROWS * SEQ * VOCAB * 4
    largest = _largest(_fused(backend, memory))
    # The largest tensor is a gradient or its float32 accumulator (V × H or tokens × H), or a chunk whose
    # size the memory budget fixes whatever T is; all far below the logits.
    budget = int(BUDGET.memory_budget_mb * 2**20)
    assert largest <= max(VOCAB * HDIM * 4, ROWS * SEQ * HDIM * 4, budget), largest
    assert largest < full / 20


def test_detector_sees_the_naive_logits():
    largest = _largest(lambda h, w, y: reference_sequence_logps(h, w, y, compute_dtype=None).sum())
    assert largest >= ROWS * SEQ * VOCAB * 4


# ------------------------------------------------------------------------------------------------ memory bounds

SCALE = 32
H_S, V_LLAMA, V_MISTRAL = 4096 // SCALE, 128256 // SCALE, 32000 // SCALE
CHUNKS_S = 64 * 2**20 // SCALE**2  # the 64 MB budget's chunks, scaled like every [N, V] or [N, H] term
PER_TOKEN = 32  # bytes of per-token vectors (mask, index, targets, lse, g): O(N), so they do not scale by 32²;
# at full size they are inside the 64 MB (2 MB at 64k tokens); here they are added to the budget.


def _budget_mb(n_tok, chunks=CHUNKS_S):
    return (chunks + PER_TOKEN * n_tok) / 2**20
BLOCKS = dict(fwd_block_m=64, fwd_block_n=128, fwd_block_k=64, bwd_block_m=64, bwd_block_n=128, bwd_block_k=64)


def _peak_backward(n_tok, vocab, dtype, opts, *, dead=0, seed=0, backend="triton", weight_dtype=None):
    """Peak live bytes inside ``backward()`` of the log-prob op (autograd's own casts and the accumulation into
    ``.grad`` included), and the gradient floor dH + dW, each in its parameter's dtype."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n_tok, H_S, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, H_S, generator=g) * H_S**-0.5).to(weight_dtype or dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, n_tok), generator=g)
    labels[0, :dead] = -100  # a masked prompt
    out = fused_sequence_logps(hidden, weight, labels, backend=backend, options=opts)
    with LiveBytes() as mode:
        out.sum().backward()
    floor = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    return mode.peak, floor, n_tok - dead


@pytest.mark.usefixtures("gpu_allocations_only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", [
    dict(n_tok=256, vocab=V_LLAMA, dead=0),  # 8k tokens, Llama-3 head: vocabulary-outer
    dict(n_tok=512, vocab=V_LLAMA, dead=77),  # 16k tokens with a masked prompt: live rows gathered
    dict(n_tok=1536, vocab=V_MISTRAL, dead=100),  # 48k tokens, Mistral head: N > V, token-outer
], ids=["8k", "16k-prompt", "mistral-48k"])
def test_fast_mode_peak_is_within_the_spec_bound(dtype, case):
    """docs/design.md §3: fast ≤ floor + 4·min(N, V)·H + 64 MB."""
    opts = LogpsOptions(memory="fast", memory_budget_mb=_budget_mb(case["n_tok"]), **BLOCKS)
    peak, floor, n_live = _peak_backward(case["n_tok"], case["vocab"], dtype, opts, dead=case["dead"])
    bound = floor + 4 * min(n_live, case["vocab"]) * H_S + opts.budget_bytes()
    assert floor < peak <= bound, (peak, bound, peak / floor)


@pytest.mark.usefixtures("gpu_allocations_only")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_float32_master_head_stays_within_the_bound_of_its_own_floor(memory, backend):
    """A float32 head under bf16 hidden states (the trainer's default): the floor is bf16 dH + float32 dW, dW is
    written straight into float32 and no bf16 copy of the head or of dW exists at any time, autograd included."""
    n_tok, dead = 512, 77  # 16k tokens at the Llama-3 head's proportions, a masked prompt
    floor = 2 * H_S * n_tok + 4 * H_S * V_LLAMA
    chunks = CHUNKS_S if memory == "fast" else min(CHUNKS_S, floor // 16)
    opts = LogpsOptions(memory=memory, memory_budget_mb=_budget_mb(n_tok, chunks), **BLOCKS)
    peak, floor, n_live = _peak_backward(n_tok, V_LLAMA, torch.bfloat16, opts, dead=dead, backend=backend,
                                         weight_dtype=torch.float32)
    extra = 4 * min(n_live, V_LLAMA) * H_S if memory == "fast" else 0
    assert floor < peak <= floor + extra + opts.budget_bytes(), (peak, floor, peak / floor)
    if memory == "lean":
        assert peak <= 1.10 * floor + PER_TOKEN * n_tok


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float32_master_head_saves_no_copy_of_the_head(backend):
    hidden, weight, labels, _ = make_inputs(rows=2, seq=9, hdim=16, vocab=40, seed=5)
    hidden = hidden.to(torch.bfloat16).requires_grad_()
    weight.requires_grad_()
    out = fused_sequence_logps(hidden, weight, labels, backend=backend)
    saved = out.grad_fn.saved_tensors
    heads = [t for t in saved if t is not None and t.shape == weight.shape]
    assert len(heads) == 1 and heads[0].dtype == torch.float32
    assert heads[0].untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()  # the parameter itself
    out.sum().backward()
    assert weight.grad.dtype == torch.float32


@pytest.mark.usefixtures("gpu_allocations_only")
@pytest.mark.parametrize("n_tok", [256, 1024], ids=["8k", "32k"])
def test_lean_mode_stays_within_a_tenth_of_the_floor(n_tok):
    """docs/design.md §3: lean ≤ 1.10 × floor at every N: its default budget is min(64 MB, floor / 16)."""
    floor = 2 * H_S * (n_tok + V_LLAMA)
    opts = LogpsOptions(memory="lean", memory_budget_mb=_budget_mb(n_tok, min(CHUNKS_S, floor // 16)), **BLOCKS)
    peak, floor, _ = _peak_backward(n_tok, V_LLAMA, torch.bfloat16, opts, dead=n_tok // 5)
    assert floor < peak <= floor + opts.budget_bytes() <= 1.10 * floor + PER_TOKEN * n_tok, peak / floor


@pytest.mark.usefixtures("gpu_allocations_only")
def test_memory_above_the_gradients_is_flat_in_t():
    """Lean: what the backward holds besides the gradients does not grow with the sequence; fast: it grows by
    the float32 dH accumulator only (4 bytes per element of dH)."""
    above = {}
    for memory in ("lean", "fast"):
        for n_tok in (128, 512):
            opts = LogpsOptions(memory=memory, memory_budget_mb=_budget_mb(512), **BLOCKS)
            peak, floor, n_live = _peak_backward(n_tok, V_LLAMA, torch.bfloat16, opts)
            above[memory, n_tok] = peak - floor
    assert above["lean", 512] <= above["lean", 128] + PER_TOKEN * (512 - 128)  # per-token vectors only
    assert above["fast", 512] - above["fast", 128] <= (4 * H_S + PER_TOKEN) * (512 - 128)


@pytest.mark.parametrize("n_live,vocab", [(16384, 128256), (65536, 128256), (8192, 32000), (131072, 32000)])
@pytest.mark.parametrize("memory", ["fast", "lean"])
@pytest.mark.parametrize("producer_bytes", [2.0, 6.0], ids=["triton", "cublas"])
def test_plans_at_full_size_fit_their_budget(n_live, vocab, memory, producer_bytes):
    """The planner at real sizes (no tensors): every chunk it asks for fits the budget, for the Triton producer
    (bf16 dz) and the cuBLAS one (float32 logits + bf16 dz)."""
    hdim = 4096
    opts = LogpsOptions(memory=memory)
    plan = plan_backward(n_live, n_live, vocab, hdim, 2, producer_bytes, opts, True, True, False)
    scratch = plan.dz_elements(plan.passes[0]) * producer_bytes + 32 * n_live
    if "token" in plan.passes:
        scratch = max(scratch, min(plan.token_chunk, n_live) * (plan.token_vocab_chunk * producer_bytes + 6 * hdim)
                      + 32 * n_live)
    assert scratch <= plan.budget <= 64 * 2**20
    floor = 2 * hdim * (n_live + vocab)
    if memory == "lean":
        assert plan.order == "two-pass" and floor + plan.budget <= 1.10 * floor
    else:
        assert plan.order == ("vocab-outer" if n_live <= vocab else "token-outer")
    # wide enough for tensor-core GEMM tiles (at 128k tokens the cuBLAS producer's 6 bytes per element allow 80)
    if "vocab" in plan.passes:
        assert plan.vocab_chunk >= 64
    if "token" in plan.passes:
        assert plan.token_vocab_chunk >= 128


@pytest.mark.usefixtures("gpu_allocations_only")
def test_the_bound_catches_a_larger_plan(monkeypatch):
    """The measurement can fail: forcing the float32 dW accumulator (4·V·H) where N < V breaks fast's bound."""
    from alphadpo_kernels.ops.sequence_logps import chunked_backward

    real = chunked_backward.plan_backward
    monkeypatch.setattr(chunked_backward, "plan_backward",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), order="token-outer", passes=("token",)))
    opts = LogpsOptions(memory="fast", memory_budget_mb=_budget_mb(256), **BLOCKS)
    peak, floor, n_live = _peak_backward(256, V_LLAMA, torch.bfloat16, opts)
    assert peak > floor + 4 * min(n_live, V_LLAMA) * H_S + opts.budget_bytes()
