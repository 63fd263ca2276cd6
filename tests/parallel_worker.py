"""Run by tests/test_parallel.py under ``torchrun`` (gloo, CPU): context- and vocabulary-parallel
``fused_sequence_logps`` and ``FusedAlphaDPOLoss`` against one unsharded process and the float64 reference.

``python -m torch.distributed.run --nproc_per_node P parallel_worker.py MODE OUT``; MODE is ``cp`` (2 ranks: torch's
head-tail layout, a contiguous split of an odd T, packed sequences), ``tp`` (2 ranks, odd vocabulary: a DTensor
head and plain shards, both backends, both memory modes), ``cptp`` (4 ranks, a 2 × 2 cp × tp mesh) or ``errors``
(2 ranks). Every rank writes ``{"ok": ..., "errors": [...], "seconds": ...}`` to ``OUT.rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from alphadpo_kernels import (  # noqa: E402
    FusedAlphaDPOLoss,
    LogpsOptions,
    fused_alpha_dpo_loss,
    fused_sequence_logps,
    reference_sequence_logps,
)
from alphadpo_kernels.ops.sequence_logps.naive import shift_labels  # noqa: E402
from helpers import make_inputs  # noqa: E402

TINY = dict(fwd_block_m=16, fwd_block_n=16, fwd_block_k=16, bwd_block_m=16, bwd_block_n=16, bwd_block_k=16,
            bwd_group_m=2, fwd_group_m=2, fwd_splits=2, chunk_tokens=7, chunk_vocab=8)
ERRORS: list[str] = []
CHECKS = [0]


def rel_err(a, e) -> float:
    a, e = a.detach().double(), e.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def close(name, a, e, tol):
    err = rel_err(a, e)
    CHECKS[0] += 1
    if not err < tol:
        ERRORS.append(f"rank {dist.get_rank()}: {name}: relative error {err:.2e} > {tol:.0e}")


def head_tail(seq: int, cp: int, r: int) -> torch.Tensor:
    """torch's load-balanced context-parallel layout: chunks r and 2·cp−1−r of T/(2·cp) tokens."""
    c = seq // (2 * cp)
    return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * cp - 1 - r) * c, (2 * cp - r) * c)])


def contiguous(seq: int, cp: int, r: int) -> torch.Tensor:
    return torch.tensor_split(torch.arange(seq), cp)[r]


def reference(hidden, weight, labels, bias=None, **kw):
    """float64 log-probs and their gradients (hidden, weight, bias) on the whole inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = reference_sequence_logps(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None, **kw)
    grads = torch.autograd.grad((out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype)).sum(), leaves)
    return out, grads


def weigh(out):
    """A row-dependent upstream gradient (so a mix-up of rows shows)."""
    return (out * torch.linspace(0.5, 1.5, out.numel())).sum()


def loss_batch(seed=3, rows=4, seq=12, hdim=16, vocab=37):
    hidden, weight, labels, _ = make_inputs(rows=rows, seq=seq, hdim=hdim, vocab=vocab, seed=seed)
    labels = shift_labels(labels, -100)  # shifted before sharding
    pairs = rows // 2
    ref = -3.0 + torch.rand(rows, generator=torch.Generator().manual_seed(seed))
    return hidden, weight, labels, ref[:pairs], ref[pairs:]


def single_loss(hidden, weight, labels, ref_c, ref_r, steps=2, bias=None):
    """One unsharded process: the loss and its gradients over ``steps`` calls (the margin state moves)."""
    module = FusedAlphaDPOLoss(process_group=SOLO)
    out = []
    for _ in range(steps):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        res = module(h, w, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, backend="torch")
        dh, dw = torch.autograd.grad(res.loss, [h, w])
        out.append(dict(loss=res.loss.detach(), dh=dh, dw=dw, mean=module.margin_mean.clone(),
                        std=module.margin_std.clone(), logps=torch.cat([res.chosen_logps, res.rejected_logps])))
    return out


# --------------------------------------------------------------------------------------------------- cp


def run_cp(cp_group, cp_rank, cp_size):
    # 1. the op, torch's head-tail layout (T divisible by 2·cp) and a contiguous split of an odd T
    for layout, seq in (("head-tail", 4 * cp_size), ("contiguous", 4 * cp_size + 1)):
        hidden, weight, labels, bias = make_inputs(rows=4, seq=seq, hdim=16, vocab=37, seed=11, bias=True)
        labels = shift_labels(labels, -100)
        labels[0, : seq - 2] = -100  # row 0's live labels all lie on the last rank: the others count 0 locally
        idx = head_tail(seq, cp_size, cp_rank) if layout == "head-tail" else contiguous(seq, cp_size, cp_rank)
        ref, (rdh, rdw, rdb) = reference(hidden, weight, labels, bias)
        for backend, memory in (("torch", "fast"), ("torch", "lean"), ("triton", "fast")):
            opts = LogpsOptions(memory=memory, **TINY)
            h = hidden[:, idx].clone().requires_grad_()
            w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
            out = fused_sequence_logps(h, w, labels[:, idx], bias=b, backend=backend, options=opts, cp_group=cp_group)
            dh, dw, db = torch.autograd.grad(weigh(out), [h, w, b])
            for t in (dw, db):
                dist.all_reduce(t, group=cp_group)  # the data-parallel reduction must sum dW over cp
            tag = f"cp {layout} {backend}/{memory}"
            close(f"{tag} logps", out, ref, 1e-5)
            close(f"{tag} dH of this rank's tokens", dh, rdh[:, idx], 1e-4)
            close(f"{tag} dW summed over cp", dw, rdw, 1e-4)
            close(f"{tag} db summed over cp", db, rdb, 1e-4)
    # 2. packed: each rank holds its slice of the packed stream and the local boundaries (a sequence may be empty)
    hidden, weight, labels, _ = make_inputs(rows=1, seq=24, hdim=16, vocab=37, seed=12)
    lens = [7, 2, 9, 6]
    cu = torch.tensor([0, 7, 9, 18, 24])
    glabels = labels[0].clone()
    glabels[cu[1:] - 1] = -100  # the last token of each sequence scores nothing (shifted before sharding)
    glabels[[0, 7, 9, 18]] = 5  # every sequence keeps a live label
    seg = torch.repeat_interleave(torch.arange(4), torch.tensor(lens))
    ref_rows = []
    for s in range(4):
        sel = seg == s
        ref_rows.append(reference(hidden[0][sel][None], weight, glabels[sel][None])[0])
    ref = torch.cat(ref_rows)
    idx = contiguous(24, cp_size, cp_rank)
    local_cu = torch.tensor([0] + [int(((seg[idx] <= s)).sum()) for s in range(4)])
    h = hidden[0][idx].clone().requires_grad_()
    out = fused_sequence_logps(h, weight, glabels[idx], cu_seqlens=local_cu, backend="torch", cp_group=cp_group)
    close("cp packed logps", out, ref, 1e-5)
    single = fused_sequence_logps(hidden[0], weight, glabels, cu_seqlens=cu, backend="torch")
    close("cp packed logps vs one process", out, single, 1e-5)

    # 3. the loss: every cp rank holds the whole loss; dW summed over cp; margin statistics of the dp group only
    hidden, weight, labels, ref_c, ref_r = loss_batch(seq=4 * cp_size)
    idx = head_tail(4 * cp_size, cp_size, cp_rank)
    single = single_loss(hidden, weight, labels, ref_c, ref_r)
    module = FusedAlphaDPOLoss(process_group=DP)
    for step, want in enumerate(single):
        h, w = hidden[:, idx].clone().requires_grad_(), weight.clone().requires_grad_()
        res = module(h, w, labels[:, idx], ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, backend="torch",
                     cp_group=cp_group)
        dh, dw = torch.autograd.grad(res.loss, [h, w])
        dist.all_reduce(dw, group=cp_group)
        close(f"cp loss step {step}", res.loss, want["loss"], 1e-5)
        close(f"cp loss dH step {step}", dh, want["dh"][:, idx], 1e-4)
        close(f"cp loss dW (summed over cp) step {step}", dw, want["dw"], 1e-4)
        close(f"cp margin_mean step {step}", module.margin_mean, want["mean"], 1e-5)
        close(f"cp margin_std step {step}", module.margin_std, want["std"], 1e-5)
    # the functional form with an NLL term: its token counts are the global ones too
    h = hidden[:, idx].clone().requires_grad_()
    try:
        got = fused_alpha_dpo_loss(h, weight, labels[:, idx], ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                   backend="torch", cp_group=cp_group, process_group=DP, nll_weight=0.5)
        want = fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                    backend="torch", process_group=SOLO, nll_weight=0.5)
        close("cp loss with nll_weight", got.loss, want.loss, 1e-5)
    except TypeError as exc:  # an older loss without nll_weight
        if "nll_weight" not in str(exc):
            raise


# --------------------------------------------------------------------------------------------------- tp


def tp_shards(vocab, tp_size):
    chunk = -(-vocab // tp_size)
    return [(min(r * chunk, vocab), min((r + 1) * chunk, vocab)) for r in range(tp_size)]


def run_tp(tp_mesh, tp_rank, tp_size):
    from torch.distributed.tensor import Shard, distribute_tensor

    vocab = 37  # odd: torch's chunking gives uneven shards (19 + 18)
    lo, hi = tp_shards(vocab, tp_size)[tp_rank]
    group = tp_mesh.get_group()
    hidden, weight, labels, bias = make_inputs(rows=4, seq=9, hdim=16, vocab=vocab, seed=21, bias=True)
    for softcap, use_bias in ((None, False), (20.0, True)):
        b_full = bias if use_bias else None
        ref, rgrads = reference(hidden, weight, labels, b_full, softcap=softcap, shift=True)
        rdh, rdw = rgrads[0], rgrads[1]
        for form in ("dtensor", "plain", "plain+vocab_start"):
            for backend, memory in (("torch", "fast"), ("torch", "lean"), ("triton", "fast"), ("triton", "lean")):
                if form != "dtensor" and backend == "triton" and memory == "lean":
                    continue  # (interpreter time; the same code path as the DTensor form)
                opts = LogpsOptions(memory=memory, **TINY)
                h = hidden.clone().requires_grad_()
                kw = {}
                if form == "dtensor":
                    w = distribute_tensor(weight.clone(), tp_mesh, [Shard(0)]).requires_grad_()
                    b = distribute_tensor(bias.clone(), tp_mesh, [Shard(0)]).requires_grad_() if use_bias else None
                    tp = tp_mesh
                else:
                    w = weight[lo:hi].clone().requires_grad_()
                    b = bias[lo:hi].clone().requires_grad_() if use_bias else None
                    tp = group
                    if form == "plain+vocab_start":
                        kw["vocab_start"] = lo
                out = fused_sequence_logps(h, w, labels, bias=b, softcap=softcap, shift=True, backend=backend,
                                           options=opts, tp_group=tp, **kw)
                leaves = [h, w] + ([b] if use_bias else [])
                grads = torch.autograd.grad(weigh(out), leaves)
                local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
                tag = f"tp {form} {backend}/{memory} softcap={softcap} bias={use_bias}"
                close(f"{tag} logps", out, ref, 1e-5)
                close(f"{tag} dH (full on every tp rank)", local[0], rdh, 1e-4)
                close(f"{tag} dW of this shard", local[1], rdw[lo:hi], 1e-4)
                if use_bias:
                    close(f"{tag} db of this shard", local[2], rgrads[2][lo:hi], 1e-4)
    # a vocabulary of one row: torch's chunking leaves the last shard empty
    h1, w1, l1, _ = make_inputs(rows=2, seq=6, hdim=16, vocab=1, seed=22)
    ref1, (rdh1, rdw1) = reference(h1, w1, l1)
    h = h1.clone().requires_grad_()
    w = distribute_tensor(w1.clone(), tp_mesh, [Shard(0)]).requires_grad_()
    out = fused_sequence_logps(h, w, l1, backend="torch", tp_group=tp_mesh)
    dh, dw = torch.autograd.grad(weigh(out), [h, w])
    close("tp empty shard logps", out, ref1, 1e-5)
    close("tp empty shard dH", dh, rdh1, 1e-4)
    if tp_rank == 0:
        close("tp empty shard dW", dw.to_local(), rdw1, 1e-4)
    # bf16 hidden states with a float32 master head: the same numbers as one process on the whole head
    hb = hidden.bfloat16().requires_grad_()
    w = distribute_tensor(weight.clone(), tp_mesh, [Shard(0)]).requires_grad_()
    out = fused_sequence_logps(hb, w, labels, shift=True, backend="torch", tp_group=tp_mesh)
    dh, dw = torch.autograd.grad(weigh(out), [hb, w])
    hs, ws = hidden.bfloat16().requires_grad_(), weight.clone().requires_grad_()
    want = fused_sequence_logps(hs, ws, labels, shift=True, backend="torch")
    wdh, wdw = torch.autograd.grad(weigh(want), [hs, ws])
    close("tp bf16 / fp32 master logps", out, want, 1e-5)
    close("tp bf16 / fp32 master dH", dh, wdh, 2e-2)
    close("tp bf16 / fp32 master dW", dw.to_local(), wdw[lo:hi], 1e-4)
    if dw.to_local().dtype != torch.float32:
        ERRORS.append(f"rank {tp_rank}: the master head's gradient is {dw.to_local().dtype}")
    # the loss with a tp-sharded head, and the reference head sharded the same way
    hidden, weight, labels, ref_c, ref_r = loss_batch()
    single = single_loss(hidden, weight, labels, ref_c, ref_r)
    module = FusedAlphaDPOLoss(process_group=DP)
    for step, want in enumerate(single):
        h = hidden.clone().requires_grad_()
        w = distribute_tensor(weight.clone(), tp_mesh, [Shard(0)]).requires_grad_()
        res = module(h, w, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, backend="torch",
                     tp_group=tp_mesh)
        dh, dw = torch.autograd.grad(res.loss, [h, w])
        close(f"tp loss step {step}", res.loss, want["loss"], 1e-5)
        close(f"tp loss dH step {step}", dh, want["dh"], 1e-4)
        close(f"tp loss dW shard step {step}", dw.to_local(), want["dw"][lo:hi], 1e-4)
        close(f"tp margin_mean step {step}", module.margin_mean, want["mean"], 1e-5)
        close(f"tp margin_std step {step}", module.margin_std, want["std"], 1e-5)
    # reference log-probs from a sharded reference head (ref_hidden / ref_weight)
    ref_h = hidden.flip(0).contiguous()
    got = fused_alpha_dpo_loss(hidden, weight[lo:hi], labels, ref_hidden=ref_h, ref_weight=weight[lo:hi] * 0.9,
                               backend="torch", tp_group=group, process_group=DP)
    want = fused_alpha_dpo_loss(hidden, weight, labels, ref_hidden=ref_h, ref_weight=weight * 0.9, backend="torch",
                                process_group=SOLO)
    close("tp loss with a sharded reference head", got.loss, want.loss, 1e-5)
    close("tp sharded reference log-probs", got.ref_chosen_logps, want.ref_chosen_logps, 1e-5)


# --------------------------------------------------------------------------------------------------- cp × tp


def run_cptp(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    cp_group, tp_mesh = mesh["cp"].get_group(), mesh["tp"]
    cp_rank, cp_size = mesh.get_local_rank(0), mesh.size(0)
    tp_rank, tp_size = mesh.get_local_rank(1), mesh.size(1)
    vocab = 37
    lo, hi = tp_shards(vocab, tp_size)[tp_rank]
    hidden, weight, labels, ref_c, ref_r = loss_batch(seq=4 * cp_size, vocab=vocab)
    idx = head_tail(4 * cp_size, cp_size, cp_rank)
    ref, (rdh, rdw) = reference(hidden, weight, labels)
    for backend in ("torch", "triton"):
        h = hidden[:, idx].clone().requires_grad_()
        w = distribute_tensor(weight.clone(), tp_mesh, [Shard(0)]).requires_grad_()
        out = fused_sequence_logps(h, w, labels[:, idx], backend=backend, options=LogpsOptions(**TINY),
                                   cp_group=cp_group, tp_group=tp_mesh)
        dh, dw = torch.autograd.grad(weigh(out), [h, w])
        dw = dw.to_local().clone()
        dist.all_reduce(dw, group=cp_group)
        close(f"cp×tp {backend} logps", out, ref, 1e-5)
        close(f"cp×tp {backend} dH of this rank's tokens", dh, rdh[:, idx], 1e-4)
        close(f"cp×tp {backend} dW shard summed over cp", dw, rdw[lo:hi], 1e-4)
    single = single_loss(hidden, weight, labels, ref_c, ref_r)
    module = FusedAlphaDPOLoss(process_group=DP)
    for step, want in enumerate(single):
        h = hidden[:, idx].clone().requires_grad_()
        w = distribute_tensor(weight.clone(), tp_mesh, [Shard(0)]).requires_grad_()
        res = module(h, w, labels[:, idx], ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, backend="torch",
                     cp_group=cp_group, tp_group=tp_mesh)
        dh, dw = torch.autograd.grad(res.loss, [h, w])
        dw = dw.to_local().clone()
        dist.all_reduce(dw, group=cp_group)
        close(f"cp×tp loss step {step}", res.loss, want["loss"], 1e-5)
        close(f"cp×tp loss dH step {step}", dh, want["dh"][:, idx], 1e-4)
        close(f"cp×tp loss dW step {step}", dw, want["dw"][lo:hi], 1e-4)
        close(f"cp×tp margin_mean step {step}", module.margin_mean, want["mean"], 1e-5)
        close(f"cp×tp margin_std step {step}", module.margin_std, want["std"], 1e-5)


# --------------------------------------------------------------------------------------------------- errors


def expect_error(name, fn, *words, exc=ValueError):
    CHECKS[0] += 1
    try:
        fn()
    except exc as e:
        missing = [w for w in words if w not in str(e)]
        if missing:
            ERRORS.append(f"rank {dist.get_rank()}: {name}: message lacks {missing}: {e}")
        return
    except Exception as e:  # noqa: BLE001
        ERRORS.append(f"rank {dist.get_rank()}: {name}: {type(e).__name__} instead of {exc.__name__}: {e}")
        return
    ERRORS.append(f"rank {dist.get_rank()}: {name}: no error")


def run_errors(group, rank, size):
    hidden, weight, labels, _ = make_inputs(rows=4, seq=8, hdim=16, vocab=37, seed=31)
    idx = contiguous(8, size, rank)
    h, lab = hidden[:, idx], labels[:, idx]
    expect_error("shift with cp_group", lambda: fused_sequence_logps(h, weight, lab, shift=True, cp_group=group),
                 "shift=True", "cp_group")
    # a row with no live label on any rank
    dead = lab.clone()
    dead[1] = -100
    expect_error("no live label anywhere", lambda: fused_sequence_logps(h, weight, dead, cp_group=group,
                                                                        backend="torch"),
                 "no live label", "cp_group")
    # ... but a row whose live labels are all on the other rank is fine (checked in run_cp too)
    other = lab.clone()
    if rank == 0:
        other[1] = -100
    try:
        fused_sequence_logps(h, weight, other, cp_group=group, backend="torch")
    except Exception as e:  # noqa: BLE001
        ERRORS.append(f"rank {rank}: a row live only on another rank was rejected: {e}")
    # mismatched shards: cp ranks with different numbers of rows
    rows = 4 if rank == 0 else 2
    expect_error("cp ranks with different rows", lambda: fused_sequence_logps(
        hidden[:rows][:, idx], weight, labels[:rows][:, idx], cp_group=group, backend="torch"), "different numbers")
    # mismatched shards: vocabulary shards that overlap (both claim rows from 0)
    expect_error("overlapping vocabulary shards", lambda: fused_sequence_logps(
        hidden, weight[:19], labels.clamp(max=18), tp_group=group, vocab_start=0, backend="torch"),
                 "do not partition the vocabulary")
    # tp ranks whose hidden states differ in shape
    expect_error("tp ranks with different hidden shapes", lambda: fused_sequence_logps(
        hidden[: 4 - 2 * rank], weight[rank * 19:(rank + 1) * 19], labels[: 4 - 2 * rank], tp_group=group,
        backend="torch"), "different shapes")
    # a label out of range on one rank only: that rank says why, the other does not hang
    bad = labels.clone()
    if rank == 1:
        bad[2, 5] = 37
    expect_error("label out of the global vocabulary on one rank", lambda: fused_sequence_logps(
        hidden, weight[rank * 19:(rank + 1) * 19], bad, tp_group=group, backend="torch"),
                 "labels must be in [0, 37)" if rank == 1 else "another rank")
    # the loss under cp without a data-parallel process_group would count each pair cp times
    h2 = hidden[:, idx]
    ref = torch.full((2,), -3.0)
    expect_error("α-DPO under cp without process_group", lambda: FusedAlphaDPOLoss()(
        h2, weight, labels[:, idx], ref_chosen_logps=ref, ref_rejected_logps=ref, cp_group=group, backend="torch"),
                 "process_group")


def main(mode, out):
    global DP, SOLO
    t0 = time.time()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]  # every rank's own group, for single-process references
    SOLO = singles[rank]
    DP = SOLO  # cp and tp replicas hold the same pairs: the data-parallel group is each rank alone here
    try:
        if mode == "cp":
            run_cp(dist.group.WORLD, rank, world)
        elif mode == "tp":
            run_tp(init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), rank, world)
        elif mode == "cptp":
            run_cptp(init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("cp", "tp")))
        elif mode == "errors":
            run_errors(dist.group.WORLD, rank, world)
        else:
            raise ValueError(mode)
    except Exception:  # noqa: BLE001
        ERRORS.append(f"rank {rank}: {traceback.format_exc()}")
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"ok": not ERRORS and CHECKS[0] > 0, "errors": ERRORS, "checks": CHECKS[0],
                   "seconds": time.time() - t0}, f)
    # every rank reaches the end before any tears its process group down: a rank that exits while the other is
    # still in a collective makes gloo abort it ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
