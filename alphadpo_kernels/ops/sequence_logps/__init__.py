"""``fused_sequence_logps``: per-sequence (length-normalised) log-probs from hidden states and an LM head,
without ever materialising ``rows × T × V`` logits. See ``naive.py`` for the math in plain torch."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Literal

import torch

from ..._validation import (
    ValueChecks,
    check_cu_seqlens_values,
    check_logit_scale,
    check_packed_inputs,
    check_packed_values,
    check_sequence_inputs,
    recall,
    remember,
)
from .naive import reference_sequence_logps, shift_labels
from .options import LogpsOptions

Backend = Literal["auto", "triton", "torch", "cublas"]

__all__ = ["fused_sequence_logps", "reference_sequence_logps", "LogpsOptions", "resolve_backend"]


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is Triton for CUDA tensors (when Triton imports), else the cublas backend when its extension is
    built, and torch otherwise."""
    if backend == "auto":
        if device.type == "cuda":
            if triton_available():
                return "triton"
            from ... import _extension

            if _extension.cuda_module() is not None:
                return "cublas"
        return "torch"
    if backend not in ("triton", "torch", "cublas"):
        raise ValueError(f"backend must be one of 'auto', 'triton', 'torch', 'cublas', got {backend!r}")
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
    return backend


def _backend_module(name: str):
    if name == "triton":
        from . import triton_backward, triton_forward

        return triton_forward.forward, triton_backward.backward
    if name == "cublas":
        from . import cublas_chunked

        return cublas_chunked.forward, cublas_chunked.backward
    from . import torch_chunked

    return torch_chunked.forward, torch_chunked.backward


def refuse_double_backward() -> None:
    """Raise inside a backward asked to build a graph (``create_graph=True``): a gradient of this gradient."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fused_sequence_logps does not support double backward (create_graph=True): its backward recomputes "
            "the logits in kernels autograd cannot differentiate, so a gradient penalty through it would be "
            "wrong or silently zero. Compute its gradients without create_graph, or use "
            "reference_sequence_logps where higher-order gradients are needed")


class _SequenceLogps(torch.autograd.Function):
    """hidden ``[..., H]`` (padded ``[rows, T, H]`` or packed ``[N, H]``), flat targets ``[N]`` (-1 where dead) and
    ``seg`` ``[N]``: the sequence each token belongs to (None for the padded layout: token ``n`` is in row
    ``n // T``). Returns ``[n_seq]`` float32 per-sequence sums or means."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seg, n_seq: int, average: bool, backend: str, opts: LogpsOptions):
        # Autocast must not touch the kernels' own precision choices (fp32 accumulation, upcast GEMMs).
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return _SequenceLogps._forward(ctx, hidden, weight, bias, targets, seg, n_seq, average, backend, opts)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, seg, n_seq, average, backend, opts):
        hdim = hidden.shape[-1]
        hidden2d = hidden.reshape(-1, hdim)  # a view for the usual contiguous layouts
        fwd, _ = _backend_module(backend)
        token_logps, lse = fwd(hidden2d, weight, bias, targets, opts)
        live = targets >= 0
        token_logps = torch.where(live, token_logps, 0.0)
        if seg is None:  # padded: one row per sequence
            sums, counts = token_logps.view(n_seq, -1).sum(1), live.view(n_seq, -1).sum(1)
        else:  # packed: segment sums (deterministic on every device: index_add_ of float32 in token order)
            sums = torch.zeros(n_seq, device=hidden.device).index_add_(0, seg, token_logps)
            counts = torch.zeros(n_seq, device=hidden.device).index_add_(0, seg, live.float())
        denom = counts.to(torch.float32) if average else torch.ones(n_seq, device=hidden.device)
        ctx.save_for_backward(hidden2d, weight, bias, targets, seg, lse, denom)
        ctx.meta = (hidden.shape, backend, opts)
        return sums / denom

    @staticmethod
    def backward(ctx, grad_logps):
        refuse_double_backward()
        with torch.autocast(device_type=grad_logps.device.type, enabled=False):
            return _SequenceLogps._backward(ctx, grad_logps)

    @staticmethod
    def _backward(ctx, grad_logps):
        hidden2d, weight, bias, targets, seg, lse, denom = ctx.saved_tensors
        shape, backend, opts = ctx.meta
        none = (None,) * 6
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        if not (need_dh or need_dw or need_db):
            return None, None, None, *none
        g_seq = grad_logps.float() / denom
        g_tok = g_seq.repeat_interleave(targets.numel() // g_seq.numel()) if seg is None else g_seq[seg]
        g_tok = torch.where(targets >= 0, g_tok, 0.0)
        if opts.logit_scale != 1.0:  # z = scale · (h·Wᵀ + b): every backend's dz takes the factor through g
            g_tok = g_tok * opts.logit_scale
        _, bwd = _backend_module(backend)
        dh, dw, db = bwd(hidden2d, weight, bias, targets, lse, g_tok, opts, need_dh, need_dw, need_db)
        dh = dh.view(shape) if dh is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, *none


def packed_layout(cu_seqlens: torch.Tensor, n_tok: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seg [N] int64, last [N] bool)``: each token's sequence, and whether it ends its sequence. No host sync,
    and no device-side assert whatever ``cu_seqlens`` holds (the value checks read it only afterwards): ``seg[t]``
    counts the sequence ends at or before ``t`` (clamped to the last sequence), and a token is last where the
    next token's sequence differs, so an empty sequence owns no token and ends nowhere."""
    cu = cu_seqlens.long()
    pos = torch.arange(n_tok, device=cu.device)
    seg = torch.searchsorted(cu[1:], pos, right=True).clamp_(max=cu.numel() - 2)
    last = torch.ones(n_tok, dtype=torch.bool, device=cu.device)
    last[:-1] = seg[1:] != seg[:-1]
    return seg, last


def shift_packed_labels(labels: torch.Tensor, last: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Packed next-token labels: position ``t`` scores ``labels[t + 1]`` within its sequence; a sequence's last
    position scores nothing (never the next sequence's first token)."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[:-1] = labels[1:]
    return shifted.masked_fill(last, ignore_index)


def prepare_sequence_inputs(hidden, weight, labels, bias, *, ignore_index: int, softcap: float | None,
                            logit_scale: float, shift: bool, cu_seqlens: torch.Tensor | None, check_values: bool,
                            prefix: str = "", checks: ValueChecks | None = None, cp_group=None, tp_group=None,
                            vocab_start: int | None = None):
    """Validate the op's inputs, padded or packed (``prefix``: ``"ref_"`` for a reference head's), and lay them out:
    returns ``(hidden, labels, seg, n_seq)`` with packed input flattened to ``[N, H]`` / ``[N]``, labels shifted
    when ``shift``, ``seg`` each packed token's sequence (None when padded) and the number of sequences.

    The value checks (``check_values``) leave their failure flags on the device and are read with one host sync:
    here, or, when ``checks`` is given, by its owner together with its other checks (a loss call: one sync for all).
    Inside a loss call (``_validation.prepared_once``) the result is remembered by the arguments' identity: the op
    the loss calls next reuses it instead of validating and laying out the same inputs again, and a reference
    head on the same labels reuses their layout. With ``cp_group`` / ``tp_group``: parallel.py's checks (global
    vocabulary, the ranks' agreement)."""
    if cp_group is not None or tp_group is not None:
        from .parallel import prepare_parallel_inputs

        return prepare_parallel_inputs(
            hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
            shift=shift, cu_seqlens=cu_seqlens, check_values=check_values, prefix=prefix, checks=checks,
            cp_group=cp_group, tp_group=tp_group, vocab_start=vocab_start)[:4]
    key = ("prepared", hidden, weight, labels, bias, cu_seqlens, ignore_index, softcap, logit_scale, shift)
    done = recall(key)
    if done is not None and (done[0] or not check_values):  # validated in this loss call already
        return done[1]
    check_logit_scale(logit_scale)
    own = checks is None and check_values
    if own:
        checks = ValueChecks()
    if cu_seqlens is None:
        check_sequence_inputs(hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift, softcap=softcap,
                              check_values=check_values, prefix=prefix, checks=checks)
        result = hidden, shift_labels(labels, ignore_index) if shift else labels, None, hidden.shape[0]
    else:
        flat_hidden, flat_labels = check_packed_inputs(hidden, labels, cu_seqlens, prefix=prefix)
        check_sequence_inputs(flat_hidden[None], weight, flat_labels[None], bias, ignore_index=ignore_index,
                              shift=False, softcap=softcap, check_values=False, prefix=prefix)
        layout_key = ("packed layout", labels, cu_seqlens, shift, ignore_index)
        layout = recall(layout_key)
        if layout is None:
            seg, last = packed_layout(cu_seqlens, flat_labels.numel())
            layout = (shift_packed_labels(flat_labels, last, ignore_index) if shift else flat_labels), seg
            remember(layout_key, layout)
        flat_labels, seg = layout
        n_seq = cu_seqlens.numel() - 1
        if check_values:
            check_cu_seqlens_values(cu_seqlens, flat_labels.numel(), checks=checks)
            check_packed_values(flat_labels, seg, n_seq, weight.shape[0], ignore_index=ignore_index, shift=shift,
                                vocab_of=f"{prefix}weight", checks=checks)
        result = flat_hidden, flat_labels, seg, n_seq
    if own:
        checks.run()
    remember(key, (check_values, result))
    return result


def fused_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    average: bool = True,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    shift: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: Backend = "auto",
    check_values: bool = True,
    options: LogpsOptions | None = None,
    cp_group=None,
    tp_group=None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """Per-sequence log-probability of the labelled tokens, fused with the LM head.

    ``logp[s] = mean_t log softmax(h[t] · Wᵀ + b)[labels[t]]`` over the tokens ``t`` of sequence ``s`` whose label
    is not ``ignore_index`` (the sum instead of the mean when ``average=False``), with logits scaled by
    ``logit_scale`` (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``) and then soft-capped as
    ``c · tanh(z / c)`` when ``softcap = c`` (Gemma-2). Differentiable in ``hidden``, ``weight`` and ``bias``;
    a tensor that does not require grad costs no backward work.

    Args:
        hidden: ``[rows, T, H]`` float32 / bfloat16 / float16 last hidden states, one sequence a row; or, with
            ``cu_seqlens``, packed sequences ``[N, H]`` (or ``[1, N, H]``).
        weight: ``[V, H]`` LM-head weight on ``hidden``'s device; a different dtype (float32 master weights
            under autocast) is rounded to ``hidden``'s chunk by chunk as it is used, as autocast does for the
            plain head, and its gradient is written in its own dtype (float32 accumulation, one rounding).
        labels: ``[rows, T]`` (packed: ``[N]`` or ``[1, N]``) integer target ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        shift: if True, the logit at position ``t`` scores the label at ``t + 1`` of the same sequence (the usual
            causal-LM shift, as the released trainer does); hidden is not copied.
        cu_seqlens: packed input: int ``[S + 1]`` sequence boundaries (0 first, N last, non-decreasing), as
            flash-attention's varlen API takes them; the result is then ``[S]``.
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked, any device;
            uses the compiled CPU epilogue when built), ``"cublas"`` (CUDA: cuBLAS GEMMs + the compiled CUDA
            epilogue) or ``"auto"`` (Triton on CUDA, else cublas when built, torch otherwise).
        check_values: check label range, ``cu_seqlens``' values and that every sequence has a live label (costs
            a host sync).
        options: memory mode (``memory="fast"`` or ``"lean"``), scratch budget, Triton block sizes
            (:class:`LogpsOptions`). Block sizes left at None come from the autotune cache for this card and
            shape, else from the architecture's starting point.
        cp_group: context parallelism: this rank holds its own tokens of every sequence (``[rows, T_local, H]``
            in any order, e.g. torch's head-tail layout; or packed with this rank's ``cu_seqlens``, where a
            sequence may hold no local token), labels shifted before sharding (``shift=True`` is refused). The
            result is the whole sequences' log-probs on every cp rank; ``dH`` covers this rank's tokens and
            ``dW`` is their share (the sum over cp is the full ``dW``). See "Parallelism" below.
        tp_group: vocabulary parallelism (a process group or 1-D DeviceMesh): ``weight`` (and ``bias``) hold this
            rank's rows of the head, either a DTensor sharded ``Shard(0)`` over that group (transformers'
            ``tp_plan``) or a plain local shard starting at ``vocab_start`` (default: the sum of the shard sizes
            on lower tp ranks, one all-gather; with torch's chunking ``rank · ceil(V / tp)``). Every tp rank holds
            the same hidden states and labels (global ids); every tp rank gets the full ``dH``, and ``dW`` /
            ``db`` of its own rows.

    Parallelism:
        The log-probs are the same numbers as one process on the whole sequences and the whole head. Collectives
        per call: cp, one all-reduce of ``[rows, 2]`` float32; tp, all-reduces of ``[N]`` (MAX) and ``[2, N]``
        (SUM) float32 in the forward and of ``dH`` ``[N, H]`` in the backward. With ``check_values`` the ranks
        also agree on their inputs first (an all-gather and a one-element all-reduce per group), and a sequence
        with no live label on any cp rank is an error. **Scaling for FSDP:** under cp each rank's ``dW`` is a
        partial sum, while FSDP2 *averages* gradients over its ``dp_shard_cp`` mesh: multiply the loss by
        ``cp_size`` before ``backward()`` (as transformers' Trainer and Megatron do) so the average is the sum
        over cp and the mean over data-parallel ranks. See docs/parallel.md.

    Returns:
        ``[rows]`` (packed: ``[S]``) float32 log-probs.
    """
    if cp_group is not None or tp_group is not None:
        from .parallel import parallel_sequence_logps

        return parallel_sequence_logps(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, average=average, softcap=softcap,
            logit_scale=logit_scale, shift=shift, cu_seqlens=cu_seqlens, backend=backend, check_values=check_values,
            options=options, cp_group=cp_group, tp_group=tp_group, vocab_start=vocab_start)
    hidden, labels, seg, n_seq = prepare_sequence_inputs(
        hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
        shift=shift, cu_seqlens=cu_seqlens, check_values=check_values)
    backend = resolve_backend(backend, hidden.device)
    # Mixed precision: under autocast the decoder hands back bf16/fp16 hidden states while the head stays in
    # float32 (master weights). Every backend rounds the head to the hidden states' dtype chunk by chunk as it
    # uses it, as autocast does for the plain LM head, and writes dW straight into the float32 gradient: no
    # weight-sized copy is saved for the backward and no bf16 dW is cast by autograd afterwards. (The [V] bias
    # is cheap: cast here.)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    if bias is not None and not bias.is_contiguous():  # the kernels read the bias with unit stride; [V] is cheap
        bias = bias.contiguous()
    opts = options or LogpsOptions()
    if opts.softcap != softcap or opts.logit_scale != logit_scale:
        opts = dataclasses.replace(opts, softcap=softcap, logit_scale=float(logit_scale))
    if backend == "triton":  # block sizes left at None: the autotune cache for this card, else the arch start
        from .tuning import resolve_blocks

        opts = resolve_blocks(opts, hidden.device, hidden.dtype, hidden.shape[-1], weight.shape[0])
    targets = torch.where(labels == ignore_index, -1, labels.long()).reshape(-1)
    return _SequenceLogps.apply(hidden, weight, bias, targets, seg, n_seq, average, backend, opts)
