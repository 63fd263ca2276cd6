"""Context-parallel (``cp_group``) and vocabulary-parallel (``tp_group``) ``fused_sequence_logps``.

A layer around the backends of this package: the kernels run unchanged on the local tokens and the local rows of
the head; what crosses ranks is a handful of small all-reduces. See docs/parallel.md for the layouts, the
scaling convention for FSDP and what was run where.

**Context parallel.** Every cp rank holds all rows (sequences) but only its own tokens of each, in any order
(torch's head-tail load-balanced layout included), with labels shifted *before* sharding. The forward reduces,
per row, the partial sum of the target log-probs and the live-token count over the cp group as one
``[rows, 2]`` float32 all-reduce (SUM); the mean is formed after it, so every cp rank holds the log-probs of
the whole sequences. The all-reduce's backward is the identity: every rank computes the same loss, so each
rank's upstream gradient is already the full one; its ``dH`` covers its own tokens and its ``dW`` is its
tokens' share (the sum over cp is the full ``dW``).

**Vocabulary parallel.** Every tp rank holds the same hidden states and labels (global token ids) and rows
``[vocab_start, vocab_start + V_local)`` of the head. The backends run on the local rows with *local*
targets: ``y − vocab_start`` where the label falls inside the shard, else :data:`NO_TARGET`, a live target
that matches no column (every backend and epilogue tests ``0 ≤ t − v_offset < chunk`` before reading a
target column: the torch epilogue, the C++ CPU and CUDA epilogues and the Triton kernels, whose column
indices are int64). That gives the local log-sum-exp and the local target logit per token; then

    M   = all-reduce MAX (lse_local)                        [N]
    S,Z = all-reduce SUM (exp(lse_local − M), z_target)     [2, N]   (the target logit lives on one rank)
    lse = M + log S,   token_logp = Z − lse

The global ``lse`` is saved, so each shard's softmax in the backward is the right one: ``dz`` and ``dW`` stay
local and ``dH = Σ_shards dz·W_shard`` is one all-reduce SUM over tp (in ``dH``'s dtype) inside the backward.
Bias, logit scale and soft-cap are per logit, so they shard with the head.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..._validation import ValueChecks, recall, remember
from .options import LogpsOptions

NO_TARGET = 2**62  # a live local target that no vocabulary column matches (int64; see the module docstring)


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


@dataclasses.dataclass(frozen=True, eq=False)
class ParallelContext:
    """What the parallel op needs besides the laid-out inputs."""

    weight: torch.Tensor  # the local rows of the head (a differentiable view of a DTensor's local shard)
    bias: torch.Tensor | None
    tp_group: object  # None: the head is not vocabulary-parallel (or its group has one rank)
    vocab_start: int
    vocab_size: int | None  # global V (None only with an explicit vocab_start and check_values=False)
    cp_group: object  # None: no context parallelism (or a group of one rank)
    check_empty: bool  # a sequence with no live label on any cp rank is an error (checked after the reduction)


def _as_group(tp_group):
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh."""
    if tp_group is not None and hasattr(tp_group, "get_group") and hasattr(tp_group, "ndim"):
        if tp_group.ndim != 1:
            raise ValueError(f"tp_group must be a process group or a 1-D DeviceMesh, got a {tp_group.ndim}-D mesh")
        return tp_group.get_group()
    return tp_group


def _dtensor_local(t, name: str, tp_group):
    """``(local shard, start, global rows)`` of a DTensor sharded ``Shard(0)`` over ``tp_group`` (Replicate on any
    other mesh dimension), with torch's chunking: ``ceil(V / tp)`` rows a rank, the last shard smaller."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = t.device_mesh, t.placements
    sharded = [i for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    if len(sharded) != 1 or type(placements[sharded[0]]) is not Shard or placements[sharded[0]].dim != 0:
        raise ValueError(f"{name} is a DTensor with placements {tuple(placements)}: vocabulary parallelism takes "
                         "Shard(0) on one mesh dimension (the tensor-parallel one) and Replicate on the others")
    d = sharded[0]
    group = mesh.get_group(d)
    if dist.get_process_group_ranks(group) != dist.get_process_group_ranks(tp_group):
        raise ValueError(f"{name} is sharded over ranks {dist.get_process_group_ranks(group)} but tp_group holds "
                         f"ranks {dist.get_process_group_ranks(tp_group)}; pass the DTensor's own mesh dimension "
                         "(e.g. mesh['tp']) as tp_group")
    rows, parts, coord = t.shape[0], mesh.size(d), mesh.get_local_rank(d)
    chunk = -(-rows // parts)
    start = min(coord * chunk, rows)
    local = t.to_local()  # differentiable: the local gradient comes back as a Shard(0) DTensor
    if local.shape[0] != min(chunk, rows - start):
        raise ValueError(f"{name}'s local shard has {local.shape[0]} rows, but torch's chunking of {rows} rows over "
                         f"{parts} ranks gives rank {coord} {min(chunk, rows - start)}")
    return local, start, rows


def _gather_ints(values: list[int], group, device) -> list[list[int]]:
    t = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def _local_head(weight, bias, tp_group, vocab_start, prefix):
    """``(w_local, b_local, start or None)``; DTensors unwrapped, shapes checked locally."""
    w_name, b_name = f"{prefix}weight", f"{prefix}bias"
    if vocab_start is not None and (tp_group is None or is_dtensor(weight)):
        raise ValueError("vocab_start is the offset of a plain local shard of the head: pass it with tp_group and "
                         "a plain weight shard (a DTensor carries its own offset)")
    if tp_group is None:
        for name, t in ((w_name, weight), (b_name, bias)):
            if is_dtensor(t):
                raise TypeError(
                    f"{name} is a sharded DTensor (FSDP2 or tensor parallel holds a shard of it here): call the loss "
                    f"inside the root module's forward, where FSDP has gathered the head (see README, Distributed), "
                    f"pass {name}.full_tensor(), or, for a tensor-parallel head sharded Shard(0) over the "
                    f"vocabulary, pass tp_group (its mesh dimension)")
        return weight, bias, 0
    if is_dtensor(weight):
        w_local, start, rows = _dtensor_local(weight, w_name, tp_group)
        b_local = None
        if bias is not None:
            if not is_dtensor(bias):
                raise ValueError(f"{w_name} is a DTensor sharded over the vocabulary but {b_name} is not: shard "
                                 f"{b_name} the same way (Shard(0) on the same mesh dimension)")
            b_local, b_start, b_rows = _dtensor_local(bias, b_name, tp_group)
            if (b_start, b_rows) != (start, rows):
                raise ValueError(f"{b_name} is sharded from row {b_start} of {b_rows} but {w_name} from row {start} of "
                                 f"{rows}: shard them the same way")
        return w_local, b_local, (start, rows)
    if is_dtensor(bias):
        raise ValueError(f"{b_name} is a DTensor but {w_name} is a plain shard: pass both as plain local shards")
    return weight, bias, None


def resolve_head(weight, bias, tp_group, vocab_start, hidden, *, check_values: bool, prefix: str = ""):
    """``(w_local, b_local, tp_group or None, vocab_start, vocab_size or None, pending error or None)``.

    A plain shard without ``vocab_start`` costs one all-gather of the shards' sizes over tp (its offset is the
    sum of the sizes on lower tp ranks; with torch's chunking that is ``rank · ceil(V / tp)``); with
    ``check_values`` the shards are also checked to tile ``[0, V)`` exactly. Errors found from gathered values
    are returned, not raised, so that every rank takes part in the rest of the validation's collectives."""
    tp_group = _as_group(tp_group)
    w_local, b_local, known = _local_head(weight, bias, tp_group, vocab_start, prefix)
    if tp_group is None:
        rows = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
        return w_local, b_local, None, 0, rows, None
    if not isinstance(w_local, torch.Tensor) or w_local.dim() != 2:
        raise ValueError(f"{prefix}weight must be a [V_local, H] tensor shard of the head, got "
                         f"{tuple(w_local.shape) if isinstance(w_local, torch.Tensor) else type(w_local).__name__}")
    v_local = int(w_local.shape[0])
    if known is not None:
        start, vocab = known
    else:
        start, vocab = vocab_start, None
    error = None
    if _size(tp_group) > 1 and (start is None or check_values):
        shape = list(hidden.shape) + [0] * (3 - hidden.dim()) if hidden.dim() <= 3 else [-1, -1, -1]
        h_dim = int(w_local.shape[1])
        rows = _gather_ints([-1 if start is None else start, v_local, h_dim, *shape], tp_group, hidden.device)
        me = dist.get_rank(tp_group)
        if start is None:
            start = sum(r[1] for r in rows[:me])
            spans = [(sum(r[1] for r in rows[:i]), r[1]) for i, r in enumerate(rows)]
        else:
            spans = [(r[0], r[1]) for r in rows]
        ordered = sorted(spans)
        tiled = ordered[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(ordered, ordered[1:]))
        if not tiled:
            error = ValueError(f"{prefix}weight shards do not partition the vocabulary: the tp ranks hold rows "
                               f"{[(s, s + n) for s, n in spans]} ([start, end) in tp rank order); each rank must "
                               "hold a distinct contiguous slice and together they must cover [0, V)")
        elif len({tuple(r[2:]) for r in rows}) != 1:
            error = ValueError(f"tp ranks hold {prefix}hidden of different shapes or heads of different widths "
                               f"({[tuple(r[2:]) for r in rows]}: H, then hidden's shape): every tensor-parallel "
                               "rank must hold the same hidden states and labels")
        if vocab is None and tiled:
            vocab = ordered[-1][0] + ordered[-1][1]
    elif start is not None and _size(tp_group) == 1 and vocab is None:
        vocab = start + v_local if start == 0 else None
    return w_local, b_local, tp_group, start, vocab, error


def _check_cp_values(labels, cu_seqlens, vocab, *, ignore_index, vocab_of, checks: ValueChecks):
    """The value checks that hold locally under context parallelism: label range, and ``cu_seqlens`` starting at
    0, ending at the local N and never decreasing (a sequence may hold no token on this rank). Whether every
    sequence keeps a live label is known only after the reduction (the op checks it there)."""
    live = labels != ignore_index
    if vocab is not None:
        bad = live & ((labels < 0) | (labels >= vocab))

        def out_of_range() -> str:
            idx = tuple(int(i) for i in bad.nonzero()[0])
            where = f"labels[{', '.join(map(str, idx))}]" if labels.dim() == 2 else f"packed position {idx[0]}"
            return (f"labels must be in [0, {vocab}) (the vocabulary of {vocab_of}) or ignore_index={ignore_index}; "
                    f"{where} = {int(labels[idx])}")

        checks.add(bad.any(), out_of_range)
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        n = labels.numel()

        def ends() -> str:
            return (f"cu_seqlens must start at 0 and end at N = {n} (this rank's packed tokens), got "
                    f"{int(cu[0])} ... {int(cu[-1])}")

        def decreasing() -> str:
            i = int((cu[1:] < cu[:-1]).nonzero()[0])
            return (f"cu_seqlens must not decrease; cu_seqlens[{i + 1}] = {int(cu[i + 1])} < "
                    f"cu_seqlens[{i}] = {int(cu[i])}")

        checks.add((cu[0] != 0) | (cu[-1] != n), ends)
        checks.add((cu[1:] < cu[:-1]).any(), decreasing)


def _proxy(t: torch.Tensor | None, rows: int, dtype=None):
    """A zero-storage stand-in of ``[rows, ...]`` with ``t``'s dtype and device, for the metadata checks."""
    if t is None:
        return None
    return torch.empty((), dtype=dtype or t.dtype, device=t.device).expand(rows, *t.shape[1:])


def prepare_parallel_inputs(hidden, weight, labels, bias, *, ignore_index: int, softcap, logit_scale: float,
                            shift: bool, cu_seqlens, check_values: bool, prefix: str = "",
                            checks: ValueChecks | None = None, cp_group=None, tp_group=None, vocab_start=None):
    """:func:`prepare_sequence_inputs` for the parallel op: returns ``(hidden, labels, seg, n_seq, ctx)``.

    The checks run on this rank's inputs against the *global* vocabulary. Under context parallelism the check
    that every sequence keeps a live label is left to the op (after its all-reduce of the counts). With
    ``check_values`` the ranks also agree before any kernel runs: one all-gather over tp (shards, shapes), one
    over cp (sequences, H) and one tiny all-reduce of the failure flag over each group, so that a rank whose
    inputs fail raises its own error and the others raise too instead of waiting in the forward's collectives.
    (``checks``, the loss's deferred checks, are not used: the parallel checks run here, with one host sync.)"""
    from . import prepare_sequence_inputs

    key = ("parallel prepared", hidden, weight, labels, bias, cu_seqlens, ignore_index, softcap, logit_scale, shift,
           cp_group, tp_group, vocab_start)
    done = recall(key)
    if done is not None and (done[0] or not check_values):
        return done[1]
    if cp_group is not None and shift:
        raise ValueError("shift=True cannot be combined with cp_group: under context parallelism a rank's tokens are "
                         "not contiguous (torch's head-tail layout), so the next label may live on another rank. "
                         "Shift the labels before sharding (transformers' shift_labels: labels[:, t] = "
                         "input_ids[:, t + 1]) and pass shift=False")
    w_local, b_local, tp, start, vocab, error = resolve_head(weight, bias, tp_group, vocab_start, hidden,
                                                             check_values=check_values, prefix=prefix)
    w_name = f"{prefix}weight"
    proxy_rows = vocab if vocab is not None else max(1, start + int(w_local.shape[0]))
    if tp is None:
        proxy_w, proxy_b = weight, bias
    else:
        proxy_w, proxy_b = _proxy(w_local, proxy_rows), _proxy(b_local, proxy_rows)
    own = ValueChecks() if check_values else None
    result = None
    try:
        if error is not None:
            raise error
        if cp_group is None:
            laid = prepare_sequence_inputs(hidden, proxy_w, labels, proxy_b, ignore_index=ignore_index,
                                           softcap=softcap, logit_scale=logit_scale, shift=shift,
                                           cu_seqlens=cu_seqlens, check_values=check_values, prefix=prefix,
                                           checks=own)
        else:
            laid = prepare_sequence_inputs(hidden, proxy_w, labels, proxy_b, ignore_index=ignore_index,
                                           softcap=softcap, logit_scale=logit_scale, shift=False,
                                           cu_seqlens=cu_seqlens, check_values=False, prefix=prefix)
            if check_values:
                _check_cp_values(laid[1], cu_seqlens, vocab, ignore_index=ignore_index, vocab_of=w_name, checks=own)
        if own is not None:
            own.run()
        result = laid
    except (ValueError, TypeError) as exc:
        error = exc
    if check_values:
        error = _agree(error, result, hidden, cp_group, tp)
    if error is not None:
        raise error
    cp = cp_group if _size(cp_group) > 1 else None
    ctx = ParallelContext(weight=w_local, bias=b_local, tp_group=tp if _size(tp) > 1 else None, vocab_start=start,
                          vocab_size=vocab, cp_group=cp, check_empty=check_values and cp is not None)
    out = (*result, ctx)
    remember(key, (check_values, out))
    return out


def _agree(error, result, hidden, cp_group, tp_group):
    """Every rank of the cp and tp groups learns whether any of them failed validation (and cp ranks that they
    hold the same number of sequences); returns the error this rank raises, or None."""
    dev = hidden.device
    if _size(cp_group) > 1:
        n_seq = result[3] if result is not None else -1
        h_dim = int(hidden.shape[-1]) if isinstance(hidden, torch.Tensor) and hidden.dim() else -1
        rows = _gather_ints([n_seq, h_dim], cp_group, dev)
        if error is None and result is not None and len({tuple(r) for r in rows if r[0] >= 0}) > 1:
            error = ValueError(f"cp ranks hold different numbers of sequences or hidden widths "
                               f"({[tuple(r) for r in rows]}: sequences, H, in cp rank order): every "
                               "context-parallel rank holds all the sequences, each with its own share of tokens")
    flag = torch.full((1,), float(error is not None), device=dev)
    for group in (tp_group, cp_group):
        if _size(group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is None and flag.item() > 0:
        error = ValueError("another rank of the context- or tensor-parallel group rejected its inputs (its own "
                           "error says why); this rank's inputs passed")
    return error


def local_targets(targets: torch.Tensor, vocab_start: int, v_local: int) -> torch.Tensor:
    """Global targets (``-1`` dead) → the shard's: ``y − vocab_start`` inside it, :data:`NO_TARGET` outside."""
    local = targets - vocab_start
    inside = (local >= 0) & (local < v_local)
    return torch.where(targets < 0, -1, torch.where(inside, local, NO_TARGET))


class _ParallelSequenceLogps(torch.autograd.Function):
    """``_SequenceLogps`` with the cp and tp reductions (see the module docstring). ``weight`` / ``bias`` are the
    local rows of the head, ``targets`` the global ids (``-1`` dead)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seg, n_seq: int, average: bool, backend: str,
                opts: LogpsOptions, par: ParallelContext):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return _ParallelSequenceLogps._forward(ctx, hidden, weight, bias, targets, seg, n_seq, average, backend,
                                                   opts, par)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, seg, n_seq, average, backend, opts, par):
        from . import _backend_module

        hdim = hidden.shape[-1]
        hidden2d = hidden.reshape(-1, hdim)
        live = targets >= 0
        tp, v_local = par.tp_group, weight.shape[0]
        tgt = local_targets(targets, par.vocab_start, v_local) if tp is not None else targets
        if v_local > 0:
            fwd, _ = _backend_module(backend)
            token_logps, lse = fwd(hidden2d, weight, bias, tgt, opts)
        else:  # an empty shard (torch's chunking of a small vocabulary over many ranks)
            token_logps = torch.zeros(targets.shape[0], device=hidden.device)
            lse = torch.full((targets.shape[0],), float("-inf"), device=hidden.device)
        if tp is not None:
            lse = torch.where(live, lse, 0.0)  # dead entries are unspecified: keep them out of the reductions
            owned = (tgt >= 0) & (tgt < v_local)
            z_target = torch.where(owned, token_logps + lse, 0.0)
            m = lse.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp)
            sz = torch.stack([torch.exp(lse - m), z_target])
            dist.all_reduce(sz, op=dist.ReduceOp.SUM, group=tp)
            lse = m + torch.log(sz[0])
            token_logps = sz[1] - lse
        token_logps = torch.where(live, token_logps, 0.0)
        if seg is None:
            sums, counts = token_logps.view(n_seq, -1).sum(1), live.view(n_seq, -1).sum(1).float()
        else:
            sums = torch.zeros(n_seq, device=hidden.device).index_add_(0, seg, token_logps)
            counts = torch.zeros(n_seq, device=hidden.device).index_add_(0, seg, live.float())
        if par.cp_group is not None:
            both = torch.stack([sums, counts], 1)  # [rows, 2] float32: one all-reduce for both
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=par.cp_group)
            sums, counts = both[:, 0], both[:, 1]
            if par.check_empty and bool((counts == 0).any()):  # the same on every cp rank: all raise together
                rows = (counts == 0).nonzero().flatten().tolist()
                raise ValueError(f"sequences {rows[:8]}{' ...' if len(rows) > 8 else ''} have no live label on any "
                                 "rank of cp_group; their log-prob would be 0/0")
        denom = counts if average else torch.ones(n_seq, device=hidden.device)
        ctx.save_for_backward(hidden2d, weight, bias, tgt, seg, lse, denom)
        ctx.meta = (hidden.shape, backend, opts, tp)
        return sums / denom

    @staticmethod
    def backward(ctx, grad_logps):
        from . import refuse_double_backward

        refuse_double_backward()
        with torch.autocast(device_type=grad_logps.device.type, enabled=False):
            return _ParallelSequenceLogps._backward(ctx, grad_logps)

    @staticmethod
    def _backward(ctx, grad_logps):
        from . import _backend_module

        hidden2d, weight, bias, targets, seg, lse, denom = ctx.saved_tensors
        shape, backend, opts, tp = ctx.meta
        none = (None,) * 7
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        if not (need_dh or need_dw or need_db):
            return None, None, None, *none
        # The cp all-reduce's backward is the identity: every cp rank holds the same loss and the same grad_logps.
        g_seq = grad_logps.float() / denom
        g_tok = g_seq.repeat_interleave(targets.numel() // g_seq.numel()) if seg is None else g_seq[seg]
        g_tok = torch.where(targets >= 0, g_tok, 0.0)
        if opts.logit_scale != 1.0:
            g_tok = g_tok * opts.logit_scale
        if weight.shape[0] > 0:
            _, bwd = _backend_module(backend)
            dh, dw, db = bwd(hidden2d, weight, bias, targets, lse, g_tok, opts, need_dh, need_dw, need_db)
        else:
            dh = torch.zeros_like(hidden2d) if need_dh else None
            dw = torch.zeros_like(weight) if need_dw else None
            db = torch.zeros(0, device=hidden2d.device) if need_db else None
        if tp is not None and dh is not None:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=tp)  # dH = Σ_shards dz·W_shard
        dh = dh.view(shape) if dh is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, *none


def parallel_sequence_logps(hidden, weight, labels, *, bias, ignore_index, average, softcap, logit_scale, shift,
                            cu_seqlens, backend, check_values, options, cp_group, tp_group, vocab_start):
    """``fused_sequence_logps`` with ``cp_group`` / ``tp_group`` (see its docstring and the module docstring)."""
    from . import resolve_backend

    hidden, labels, seg, n_seq, par = prepare_parallel_inputs(
        hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
        shift=shift, cu_seqlens=cu_seqlens, check_values=check_values, cp_group=cp_group, tp_group=tp_group,
        vocab_start=vocab_start)
    backend = resolve_backend(backend, hidden.device)
    w, b = par.weight, par.bias
    if b is not None and b.dtype != hidden.dtype:
        b = b.to(hidden.dtype)
    if b is not None and not b.is_contiguous():
        b = b.contiguous()
    opts = options or LogpsOptions()
    if opts.softcap != softcap or opts.logit_scale != logit_scale:
        opts = dataclasses.replace(opts, softcap=softcap, logit_scale=float(logit_scale))
    if backend == "triton":
        from .tuning import resolve_blocks

        opts = resolve_blocks(opts, hidden.device, hidden.dtype, hidden.shape[-1], max(1, w.shape[0]))
    targets = torch.where(labels == ignore_index, -1, labels.long()).reshape(-1)
    return _ParallelSequenceLogps.apply(hidden, w, b, targets, seg, n_seq, average, backend, opts, par)
