"""The GEMM work each path issues, counted on the CPU (docs/design.md §4) and held to its plan: forward + backward is
4 GEMM units in ``memory="fast"`` and 5 in ``"lean"`` (a unit = one ``[N, H] × [H, V]`` product), the backward
visits live tokens only, and a gradient nobody needs costs nothing. A later change cannot quietly add a pass.

Two independent counts: every torch GEMM by a dispatch mode (whatever calls it), and every Triton launch by
its logical extent (the launchers report it); the paths' own accounting must agree with the dispatch mode.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alphadpo_kernels import LogpsOptions, fused_sequence_logps
from alphadpo_kernels.ops.sequence_logps.instrument import count_gemm_work
from helpers import cublas_on_cpu

aten = torch.ops.aten


class TorchGemmFlops(TorchDispatchMode):
    """Flops of every aten matrix product, any overload, in-place or not."""

    PACKETS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.matmul}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.PACKETS:
            a, b = (args[0], args[1]) if func.overloadpacket in (aten.mm, aten.bmm, aten.matmul) else (args[1], args[2])
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        return func(*args, **(kwargs or {}))


OPTS = LogpsOptions(fwd_block_m=16, fwd_block_n=64, fwd_block_k=16, bwd_block_m=16, bwd_block_n=64, bwd_block_k=16,
                    chunk_tokens=24, chunk_vocab=48)


def _run(backend, memory, *, n_tok=60, vocab=150, hdim=24, dead=0, need=("hidden", "weight"), dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, n_tok // 2, hdim, generator=g).to(dtype).requires_grad_("hidden" in need)
    weight = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(dtype).requires_grad_("weight" in need)
    labels = torch.randint(0, vocab, (2, n_tok // 2), generator=g)
    labels[:, : dead // 2] = -100
    opts = dataclasses.replace(OPTS, memory=memory)
    with count_gemm_work() as fwd_log:
        out = fused_sequence_logps(hidden, weight, labels, backend=backend, options=opts)
    with count_gemm_work() as bwd_log, TorchGemmFlops() as torch_flops:
        out.sum().backward()
    unit = 2 * (n_tok - dead) * vocab * hdim
    own = bwd_log.flops - bwd_log.flops_of("triton:")
    assert own == torch_flops.flops, "a torch GEMM the path does not account for"
    return fwd_log.flops / (2 * n_tok * vocab * hdim), bwd_log.flops / unit


BACKENDS = ["torch", "triton", "cublas"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cublas":
        cublas_on_cpu(monkeypatch)
    return request.param


@pytest.mark.parametrize("memory,units", [("fast", 4), ("lean", 5)])
@pytest.mark.parametrize("shape", [dict(vocab=150), dict(vocab=40)], ids=["vocab-outer", "token-outer"])
def test_forward_plus_backward_is_the_planned_number_of_units(backend, memory, units, shape):
    fwd, bwd = _run(backend, memory, **shape)
    assert fwd == 1 and bwd == units - 1


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_backward_work_scales_with_live_tokens_only(backend, memory):
    _, bwd = _run(backend, memory, n_tok=60, dead=22)
    assert bwd == (3 if memory == "fast" else 4)


@pytest.mark.parametrize("need", [("hidden",), ("weight",)])
@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_one_gradient_costs_two_units(backend, memory, need):
    _, bwd = _run(backend, memory, need=need)
    assert bwd == 2


def test_half_precision_paths_issue_the_same_work(backend):
    assert _run(backend, "fast", dtype=torch.bfloat16) == (1, 3)


def test_the_count_sees_an_extra_pass(monkeypatch):
    """The structure tests can fail: a backward that recomputes the logits once more is caught."""
    from alphadpo_kernels.ops.sequence_logps import triton_grad_logits

    real = triton_grad_logits.TritonGradLogits.__call__

    def twice(self, *args, **kwargs):
        real(self, *args, **kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(triton_grad_logits.TritonGradLogits, "__call__", twice)
    assert _run("triton", "fast")[1] == 4
