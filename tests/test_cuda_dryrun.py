"""The CUDA paths dry-run on fake "cuda" tensors at the real Llama-3-8B head (benchmarks/cuda_dryrun.py).

No GPU: ``FakeTensorMode`` runs every aten op's meta kernel, Triton launches and the CUDA epilogue are recorded and
checked (addresses inside their allocations, grids, devices), autograd is walked in Python, and peak live bytes,
GEMM units and host syncs are held to docs/design.md §3–4 / the README. The harness's checks are shown to fail where they
should: a launch off its device, an out-of-bounds launch, a larger backward plan, a weight-sized forward copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

import pytest
import torch
import torch.utils.cpp_extension

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import cuda_dryrun as dry  # noqa: E402

if not torch.utils.cpp_extension.is_ninja_available():  # the fake device guard is built with ninja
    pytest.skip("the CUDA dry run builds a tiny C++ device guard: pip install ninja", allow_module_level=True)

K = dry.K


def _assert_ok(res: dry.Result) -> None:
    assert res.ok, "\n".join([res.case.id, *res.failures, getattr(res, "traceback", "")])


@pytest.mark.parametrize("case", dry.quick_cases(), ids=lambda c: c.id)
def test_case_at_the_llama3_head(case):
    res = dry.run_case(case)
    _assert_ok(res)
    assert res.launches > 0 and res.bwd_peak > res.floor  # the gradients themselves were seen being allocated


@pytest.mark.parametrize("n_tok", [16 * K, 64 * K], ids=["16k", "64k"])
def test_tile_skipping_backward_at_the_llama3_head(n_tok):
    """The opt-in skipping kernel keeps fast's bound too: live rows only in its float32 dH accumulator, and its
    float32 dW chunk released before dH is written."""
    res = dry.run_case(dry.Case("op", n_tok, "padded", "fast", "triton", "bf16", filter=True))
    assert res.launch_kinds.get("_skip_backward_kernel"), res.failures  # its launches were checked
    _assert_ok(res)


def test_the_fake_card_is_what_the_library_sees():
    from alphadpo_kernels.ops.sequence_logps import triton_common, tuning
    from alphadpo_kernels.ops.sequence_logps.options import LogpsOptions

    with dry.fake_cuda_world() as (fake_mode, shadows, rec, fake_cuda), fake_mode, shadows:
        dev = torch.device("cuda", 1)
        assert triton_common.sm_count(dev) == 132 and torch.cuda.get_device_capability(dev) == (9, 0)
        opts = tuning.resolve_blocks(LogpsOptions(), dev, torch.bfloat16, dry.HDIM, dry.VOCAB)
        assert opts.fwd_block_k == tuning.ARCH_DEFAULTS[9]["fwd_block_k"]
        x = torch.empty(4, device=dev)
        with triton_common.launch_device(x):
            assert torch.cuda.current_device() == 1
        assert torch.cuda.current_device() == 0
    assert not torch.cuda.is_available() or torch.version.cuda is not None  # restored


def test_a_launch_off_the_current_device_fails(monkeypatch):
    """The head on cuda:1 while cuda:0 is current: a Triton launch outside launch_device is caught."""
    from alphadpo_kernels.ops.sequence_logps import triton_forward, triton_grad_logits

    for mod in (triton_forward, triton_grad_logits):
        monkeypatch.setattr(mod, "launch_device", lambda t: contextlib.nullcontext())
    res = dry.run_case(dry.Case("op", 8 * K, "padded", "fast", "triton", "bf16", device="cuda:1"))
    assert not res.ok and "current device at the launch is cuda:0" in res.error, res.failures


def test_an_extension_call_off_the_current_device_fails(monkeypatch):
    from alphadpo_kernels import _extension

    monkeypatch.setattr(_extension, "_on_device", lambda t: contextlib.nullcontext())
    res = dry.run_case(dry.Case("op", 8 * K, "packed", "fast", "cublas", "bf16", device="cuda:1"))
    assert not res.ok and "current stream" in res.error, res.failures


def test_an_out_of_bounds_launch_fails():
    from alphadpo_kernels.ops.sequence_logps import triton_forward

    with dry.fake_cuda_world() as (fake_mode, shadows, rec, fake_cuda), fake_mode, shadows:
        n, splits = 1000, 3
        part = torch.empty(3, splits, n, device="cuda")
        tgt = torch.empty(n, dtype=torch.int64, device="cuda")
        lse, logp = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        triton_forward._merge_splits_kernel[(1,)](part, tgt, lse, logp, n, splits, BLOCK=1024)  # in bounds
        with pytest.raises(dry.DryRunError, match="addresses element 1000 of an allocation of 1000"):
            triton_forward._merge_splits_kernel[(1,)](part, tgt, lse[1:], logp, n, splits, BLOCK=1024)  # 1 short
        with pytest.raises(dry.DryRunError, match="grid"):
            triton_forward._merge_splits_kernel[(2**31,)](part, tgt, lse, logp, n, splits, BLOCK=1024)
    assert len(rec.launches) == 1


def test_a_larger_backward_plan_breaks_the_bound(monkeypatch):
    """Forcing the float32 dW accumulator (token-outer) where N < V: fast's bound catches it."""
    from alphadpo_kernels.ops.sequence_logps import chunked_backward

    real = chunked_backward.plan_backward
    monkeypatch.setattr(chunked_backward, "plan_backward",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), order="token-outer", passes=("token",)))
    res = dry.run_case(dry.Case("op", 8 * K, "padded", "fast", "triton", "bf16"))
    assert not res.ok and any("backward peak" in f for f in res.failures), res.failures


def test_a_weight_sized_forward_copy_fails(monkeypatch):
    """The float32 master head rounded whole in the forward (what the op did before it cast tile by tile)."""
    from alphadpo_kernels.ops.sequence_logps import triton_forward

    real = triton_forward.forward
    monkeypatch.setattr(triton_forward, "forward", lambda h, w, *a, **k: real(h, w.to(h.dtype), *a, **k))
    res = dry.run_case(dry.Case("op", 8 * K, "padded", "fast", "triton", "fp32"))
    assert not res.ok and any("weight-sized" in f for f in res.failures), res.failures


def test_an_extra_host_sync_is_counted(monkeypatch):
    from alphadpo_kernels.ops.sequence_logps import chunked_backward

    real = chunked_backward.chunked_backward

    def with_sync(hidden2d, weight, bias, targets, *a, **k):
        int((targets >= 0).sum())  # reads a device value on the host
        return real(hidden2d, weight, bias, targets, *a, **k)

    from alphadpo_kernels.ops.sequence_logps import triton_backward

    monkeypatch.setattr(triton_backward, "chunked_backward", with_sync)
    res = dry.run_case(dry.Case("op", 8 * K, "padded", "fast", "triton", "bf16"))
    assert not res.ok and any("host syncs" in f for f in res.failures), res.failures


def test_the_python_engine_matches_autograd():
    """run_backward (the dry run's engine) gives autograd's gradients on a real CPU graph: a float32 master head
    beside bf16 hidden states (the engine's dtype casts), a node reached twice (gradient buffers add up)."""
    from alphadpo_kernels import fused_sequence_logps

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 8, generator=g).bfloat16()
    weight = torch.randn(11, 8, generator=g) / 3
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[:, :2] = -100
    grads = []
    for engine in ("autograd", "python"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        scale = torch.tensor(1.5, requires_grad=True)
        out = fused_sequence_logps(h, w.bfloat16(), labels, backend="torch")  # autograd casts dW back to float32
        loss = (out * scale).sum() + out[0] ** 2
        loss.backward() if engine == "autograd" else dry.run_backward(loss)
        grads.append((h.grad, w.grad, scale.grad))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype and torch.equal(a, b)
