"""Two CPU processes (gloo): gathered margin statistics, loss and gradients equal one process on the whole batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alphadpo_kernels import FusedAlphaDPOLoss
from helpers import make_inputs

STEPS = 3


def _batch(step, pairs):
    hidden, weight, labels, _ = make_inputs(rows=2 * pairs, seq=11, hdim=16, vocab=37, seed=100 + step)
    gen = torch.Generator().manual_seed(200 + step)
    ref = -3.0 + torch.rand(2 * pairs, generator=gen)
    return hidden, weight, labels, ref[:pairs], ref[pairs:]


def _rows(rank, split, pairs):
    """Rows of this rank's pairs in the chosen-first layout, and its slice of pair indices."""
    lo = sum(split[:rank])
    idx = torch.arange(lo, lo + split[rank])
    return torch.cat([idx, idx + pairs]), idx


def _run(rank, split, pairs):
    module = FusedAlphaDPOLoss(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2)
    records = []
    for step in range(STEPS):
        hidden, weight, labels, ref_c, ref_r = _batch(step, pairs)
        rows, idx = _rows(rank, split, pairs)
        weight.requires_grad_()
        out = module(hidden[rows], weight, labels[rows], ref_chosen_logps=ref_c[idx], ref_rejected_logps=ref_r[idx],
                     backend="torch")
        (dw,) = torch.autograd.grad(out.loss, [weight])
        records.append(dict(loss=out.loss.detach(), mean=module.margin_mean.clone(), std=module.margin_std.clone(),
                            dw=dw))
    return records


def _worker(rank, world, init_file, split, pairs, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_run(rank, split, pairs), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("split", [(2, 2), (3, 1)], ids=["equal", "unequal"])
def test_two_processes_equal_one(split, tmp_path):
    pairs = sum(split)
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, init_file, split, pairs, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _run(0, (pairs,), pairs)  # one process, the whole batch
    for step in range(STEPS):
        for r in range(2):
            assert torch.allclose(ranks[r][step]["mean"], single[step]["mean"], rtol=1e-6, atol=1e-7), (step, r)
            assert torch.allclose(ranks[r][step]["std"], single[step]["std"], rtol=1e-6, atol=1e-7), (step, r)
        if split[0] == split[1]:
            # Data-parallel training averages the ranks' losses and gradients.
            loss = (ranks[0][step]["loss"] + ranks[1][step]["loss"]) / 2
            dw = (ranks[0][step]["dw"] + ranks[1][step]["dw"]) / 2
            assert torch.allclose(loss, single[step]["loss"], rtol=1e-5), step
            assert torch.allclose(dw, single[step]["dw"], rtol=1e-4, atol=1e-7), step
