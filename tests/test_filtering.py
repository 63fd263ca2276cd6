"""Backward tile skipping (opt-in, the atomic kernel of triton_skip_backward.py): off means the exact chunked
backward; on, peaked bf16 inputs skip most tiles and stay within the bf16 tolerance, while near-uniform inputs
skip nothing."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from alphadpo_kernels import LogpsOptions, fused_sequence_logps, reference_sequence_logps
from alphadpo_kernels.ops.sequence_logps import triton_backward, triton_forward, triton_skip_backward
from conftest import rel_err
from helpers import SMALL_BLOCKS, make_inputs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_loss  # noqa: E402

BLOCKS = dataclasses.replace(SMALL_BLOCKS, chunk_vocab=None)


def _peaked(dtype=torch.bfloat16, seed=0):
    case = bench_loss.Case("fused", "peaked", T=24, pairs=1, H=64, V=4096, dtype="bf16", device="cpu", seed=seed)
    hidden, weight, labels, _, _ = bench_loss.make_inputs(case)
    labels[:, :5] = -100
    return hidden.to(dtype), weight.to(dtype), labels


def _backward(hidden, weight, labels, opts):
    """Gradients of sum(logps) and the number of skipped tiles, through the backend functions."""
    h2d = hidden.reshape(-1, hidden.shape[-1])
    targets = torch.where(labels == -100, -1, labels).reshape(-1)
    _, lse = triton_forward.forward(h2d, weight, None, targets, opts)
    live = (targets >= 0).view(labels.shape)
    g = torch.where(live, 1.0 / live.sum(1, keepdim=True), 0.0).reshape(-1)
    count = torch.zeros(1, dtype=torch.int32)
    if opts.filter_threshold(hidden.dtype) is None:  # the default, exact path: the chunked GEMM backward
        dh, dw, _ = triton_backward.backward(h2d, weight, None, targets, lse, g, opts, True, True, False)
        return dh, dw, 0
    dh, dw, _ = triton_skip_backward.skip_backward(h2d, weight, None, targets, lse, g, opts, True, True, False,
                                                   skip_count=count)
    return dh, dw, int(count)


def _tiles(labels, vocab, opts):
    return -(-labels.numel() // opts.bwd_block_m) * -(-vocab // opts.bwd_block_n)


AUTO = dataclasses.replace(BLOCKS, filter_eps="auto")


def _tile_mask(hidden, weight, labels, opts, eps):
    """The documented skip rule in plain torch: over the live tokens only (gathered in token order, as the
    backward does), tiles of bwd_block_m live tokens × bwd_block_n vocabulary entries whose softmax entries are all
    below eps and that hold no target. Returned in the full token layout (dead rows: never skipped, dz is 0)."""
    h = hidden.double().reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    live = y != -100
    p = torch.where(live[:, None], (h @ weight.double().T).softmax(-1), 0.0)
    pc, yc = p[live], y[live]
    bm, bn = opts.bwd_block_m, opts.bwd_block_n
    n, v = pc.shape
    pad = torch.nn.functional.pad(pc, (0, -(-v // bn) * bn - v, 0, -(-n // bm) * bm - n))
    target = torch.zeros_like(pad, dtype=torch.bool)
    target[torch.arange(n), yc] = True
    shape = (pad.shape[0] // bm, bm, pad.shape[1] // bn, bn)
    skip = (pad.reshape(shape).amax(dim=(1, 3)) < eps) & ~target.reshape(shape).any(dim=3).any(dim=1)
    mask = torch.zeros(y.numel(), p.shape[1], dtype=torch.bool)
    mask[live] = skip.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:n, :v]
    return mask, p, live, skip


def test_default_is_exact_for_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert BLOCKS.filter_threshold(dtype) is None
        assert dataclasses.replace(BLOCKS, filter_eps=0.0).filter_threshold(dtype) is None
    assert AUTO.filter_threshold(torch.float32) is None  # "auto" never filters float32
    assert AUTO.filter_threshold(torch.bfloat16) == 2.0**-12 and AUTO.filter_threshold(torch.float16) == 2.0**-15
    hidden, weight, labels = _peaked()  # where "auto" would skip, the default does not
    dh0, dw0, n0 = _backward(hidden, weight, labels, BLOCKS)
    dh1, dw1, n1 = _backward(hidden, weight, labels, dataclasses.replace(BLOCKS, filter_eps=0.0))
    assert n0 == n1 == 0 and torch.equal(dh0, dh1) and torch.equal(dw0, dw1)


def test_near_uniform_bf16_skips_nothing():
    hidden, weight, labels, _ = make_inputs(rows=2, seq=24, hdim=32, vocab=1024, dtype=torch.bfloat16,
                                            logit_scale=1.0, seed=2)
    dh, dw, skipped = _backward(hidden, weight, labels, AUTO)
    unfiltered = _backward(hidden, weight, labels, dataclasses.replace(BLOCKS, filter_eps=1e-30))  # same kernel
    assert skipped == 0 and torch.equal(dh, unfiltered[0]) and torch.equal(dw, unfiltered[1])


def test_peaked_bf16_skips_exactly_the_documented_tiles():
    """With filtering on, the kernel's gradients are the exact gradients with the dz of the documented
    tiles set to zero: the same tiles, no others (checked against fp64 within the bf16 bar)."""
    hidden, weight, labels = _peaked()
    dh, dw, skipped = _backward(hidden, weight, labels, AUTO)
    mask, p, live, tiles = _tile_mask(hidden, weight, labels, AUTO, 2.0**-12)
    n_tok = labels.numel()
    tiles_skipped = int(tiles.sum())
    assert skipped == tiles_skipped > 0.15 * _tiles(labels, weight.shape[0], AUTO), (skipped, tiles_skipped)
    y = labels.reshape(-1)
    g = torch.where(live, 1.0 / live.view(labels.shape).sum(1, keepdim=True).expand_as(labels).reshape(-1), 0.0)
    onehot = torch.zeros_like(p)
    onehot[live.nonzero().flatten(), y[live]] = 1.0
    dz = (g.double()[:, None] * (onehot - p)).masked_fill(mask, 0.0)
    ref_dh, ref_dw = dz @ weight.double(), dz.T @ hidden.double().reshape(n_tok, -1)
    assert rel_err(dh, ref_dh) < 2e-2 and rel_err(dw, ref_dw) < 2e-2


def test_a_threshold_that_drops_real_mass_is_caught():
    """The tolerance is not vacuous: skipping tiles that matter breaks it."""
    hidden, weight, labels = _peaked()
    dh, dw, _ = _backward(hidden, weight, labels, dataclasses.replace(BLOCKS, filter_eps=0.3))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    _, ref_dw = torch.autograd.grad(reference_sequence_logps(h64, w64, labels).sum(), [h64, w64])
    assert rel_err(dw, ref_dw) > 2e-2


def test_public_op_is_exact_unless_asked():
    hidden, weight, labels = _peaked()
    outs = []
    for opts in (BLOCKS, AUTO):
        w = weight.clone().requires_grad_()
        logps = fused_sequence_logps(hidden, w, labels, backend="triton", options=opts)
        outs.append((logps, torch.autograd.grad(logps.sum(), [w])[0]))
    assert torch.equal(outs[0][0], outs[1][0])  # the forward never filters
    assert not torch.equal(outs[0][1], outs[1][1])  # filter_eps="auto" did skip tiles in bf16


@pytest.mark.parametrize("bad", ["fast", 1.5, -0.1])
def test_bad_filter_eps(bad):
    with pytest.raises(ValueError, match="filter_eps must be"):
        LogpsOptions(filter_eps=bad)


def test_reference_pass_is_one_forward_launch(monkeypatch):
    """Reference log-probs from ref_hidden / ref_weight cost one forward kernel and no backward."""
    from alphadpo_kernels import fused_alpha_dpo_loss

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = triton_forward.forward, triton_backward.backward

    def count_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def count_bwd(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(triton_forward, "forward", count_fwd)
    monkeypatch.setattr(triton_backward, "backward", count_bwd)
    hidden, weight, labels, _ = make_inputs(rows=4, seq=13, hdim=16, vocab=40, seed=4)
    ref_hidden = hidden + 0.1
    hidden.requires_grad_()
    out = fused_alpha_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight, backend="triton",
                               options=SMALL_BLOCKS)
    assert calls == {"fwd": 2, "bwd": 0}  # the reference's forward and the policy's forward
    out.loss.backward()
    assert calls == {"fwd": 2, "bwd": 1}  # only the policy's backward
