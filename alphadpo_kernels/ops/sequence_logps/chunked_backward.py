"""The backward of every backend: ``dz`` by chunks, both gradients by real GEMMs with float32 accumulation.

docs/design.md §2. With ``g`` the per-token upstream gradient and ``lse`` the forward's log-sum-exp, the logits gradient
is ``dz = g · (onehot(y) − softmax(z))`` (× the soft-cap derivative); then ``dH = dz·W`` and ``dW = dzᵀ·H``.
A *producer* writes ``dz`` for a block of tokens and a vocabulary chunk, recomputing the logits (the Triton
kernel of triton_grad_logits.py, or cuBLAS / torch logits + an epilogue); this driver feeds each chunk to the
two gradient GEMMs. No atomics, so the gradients are deterministic.

Plans (:func:`plan_backward`), in GEMM units of ``[N_live, H] × [H, V]`` (the forward adds one):

* ``vocab-outer`` (``memory="fast"``, ``N_live ≤ V``): per vocabulary chunk, ``dz[:, vs:ve]`` for all live
  tokens, ``dW[vs:ve] = dzᵀ·H`` as one GEMM written once in the weight's dtype, ``dH += dz·W[vs:ve]`` into a
  float32 ``[N_live, H]`` accumulator. 3 units; scratch = that accumulator + one dz chunk.
* ``token-outer`` (``memory="fast"``, ``N_live > V``): the mirror image, float32 ``[V, H]`` accumulator for dW,
  ``dH`` of each token chunk finished in its own small float32 accumulator. 3 units.
* ``two-pass`` (``memory="lean"``, or only one gradient needed): a vocabulary pass for ``dW`` (one GEMM per
  chunk over all tokens, no float32 dW buffer) and a token pass for ``dH`` (float32 accumulator per token
  chunk only). 4 units with both gradients; 2 when only one is needed.

Only live tokens (label ≠ ignore_index) take part. Their hidden rows are gathered, contiguous, into the
buffer of ``dH`` itself (its memory is part of the floor), so prompt and padding rows, which may hold anything
(NaN from fully masked attention rows), never reach a GEMM. (When ``dH`` is not needed, a frozen decoder with a
trained head, and some tokens are masked, the gathered rows take a buffer of their own: ``N_live·H`` elements
outside the budget.) ``dH`` is written row by row as token chunks finish,
last chunk first, so a row is never overwritten before it has been read (``live_idx[j] ≥ j``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .gemm import addmm_f32, exact_matmul, mm_into
from .options import LogpsOptions

ALIGN_VOCAB = 128  # chunk widths are multiples of this (tensor-core tiles, 256-byte rows) when they fit
ALIGN_TOKENS = 64
MIN_COLS = 16  # narrower chunks than the budget allows only when even this many columns exceed it
PER_TOKEN_BYTES = 32  # per-token vectors of the backward: live mask, row index, targets, lse, g (compacted)


class GradLogitsProducer(Protocol):
    dz_dtype: torch.dtype
    scratch_dtype: torch.dtype | None  # a second chunk-sized buffer the producer needs (cuBLAS: float32 logits)
    bytes_per_element: float  # scratch bytes per element of a dz chunk, all of the producer's buffers included

    def __call__(self, hc: torch.Tensor, tgt: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, vs: int, ve: int,
                 dz: torch.Tensor, db: torch.Tensor | None, scratch: torch.Tensor | None,
                 w_c: torch.Tensor | None = None) -> None:
        """Write ``dz [rows, ve − vs]`` for hidden rows ``hc``; add its float32 column sums into ``db``.
        ``scratch`` is a flat buffer of ``scratch_dtype`` with room for ``dz.numel()`` elements; ``w_c`` the
        weight rows ``[vs, ve)`` already in ``hc``'s dtype, when the driver has them (else the producer reads its
        own weight)."""


def operand_chunk(weight: torch.Tensor, vs: int, ve: int, dtype: torch.dtype,
                  buf: torch.Tensor | None = None) -> torch.Tensor:
    """Weight rows ``[vs, ve)`` as a GEMM operand of ``dtype``: a view when the dtypes agree; for float32 master
    weights under bf16 / fp16 hidden states the chunk rounded (to nearest even, as ``.to`` and autocast round the
    whole head for the plain LM head) into ``buf`` (a flat buffer of ``dtype`` reused chunk after chunk, so no
    two rounded chunks are ever alive together) or a new tensor. No weight-sized copy exists at any time."""
    w_c = weight[vs:ve]
    if w_c.dtype == dtype:
        return w_c
    if buf is None:
        return w_c.to(dtype)
    return buf[: w_c.numel()].view(w_c.shape).copy_(w_c)


@dataclass(frozen=True)
class BackwardPlan:
    order: str  # "vocab-outer" | "token-outer" | "two-pass"
    passes: tuple[str, ...]  # "vocab" and/or "token", in execution order
    n_live: int
    vocab: int
    hdim: int
    vocab_chunk: int  # columns of a vocabulary-pass chunk (all live tokens)
    token_chunk: int  # rows of a token-pass chunk
    token_vocab_chunk: int  # columns of a token-pass sub-chunk
    budget: int  # scratch bytes the chunks were sized for

    @property
    def gemm_units(self) -> int:
        """Backward GEMM work in units of ``N_live·V·H`` multiply-adds (a recompute or a gradient GEMM each)."""
        return {"vocab-outer": 3, "token-outer": 3}.get(self.order, 2 * len(self.passes))

    def dz_elements(self, pass_: str) -> int:
        """Elements of the dz chunk buffer of a pass (allocated for that pass only)."""
        if pass_ == "vocab":
            return self.n_live * self.vocab_chunk
        return min(self.token_chunk, self.n_live) * self.token_vocab_chunk


def _fit(x: float, align: int, hi: int, lo: int = 1) -> int:
    """The largest size ≤ x, a multiple of ``align`` when x allows (else of 16), within [lo, hi]."""
    x = int(x)
    x = x // align * align if x >= align else x // 16 * 16 or x
    return max(min(lo, hi), min(x, hi))


def plan_backward(n_live: int, n_tok: int, vocab: int, hdim: int, itemsize: int, bytes_per_element: float,
                  opts: LogpsOptions, need_dh: bool, need_dw: bool, need_db: bool, *,
                  weight_itemsize: int | None = None, cast_itemsize: int = 0) -> BackwardPlan:
    """Chunk sizes and loop order for the given sizes, memory mode and budget (see the module docstring).

    ``itemsize`` is the hidden states' (dH's) element size, ``weight_itemsize`` dW's (default the same);
    ``cast_itemsize`` the element size of the rounded weight chunk a float32 master head needs per vocabulary
    column (0 when the weight is already in the operands' dtype)."""
    w_item = itemsize if weight_itemsize is None else weight_itemsize
    gradients = (n_tok * itemsize if need_dh else 0) * hdim + (vocab * w_item if need_dw else 0) * hdim
    budget = opts.budget_bytes(gradients)
    avail = max(budget - PER_TOKEN_BYTES * n_tok, budget // 2)
    if opts.memory == "fast" and need_dh and need_dw:
        # the smaller float32 accumulator. (A float32 dW would be its own accumulator under token-outer, but that
        # order re-reads and re-writes all of dW once per token chunk; vocab-outer's dH accumulator is cheaper.)
        order = "vocab-outer" if n_live <= vocab else "token-outer"
        passes = ("vocab",) if order == "vocab-outer" else ("token",)
    else:
        order = "two-pass"
        passes = tuple(p for p, needed in (("vocab", need_dw or (need_db and not need_dh)), ("token", need_dh))
                       if needed)
    per_col = cast_itemsize * hdim  # the rounded weight chunk of a float32 master head, per vocabulary column
    vc = min(opts.chunk_vocab or _fit(avail / (bytes_per_element * max(n_live, 1) + per_col), ALIGN_VOCAB, vocab,
                                      MIN_COLS), vocab)
    # token pass: a float32 dH accumulator and a row scatter buffer per chunk, the rest for dz sub-chunks
    per_row = (4 + itemsize) * hdim if need_dh else 0
    tc = min(opts.chunk_tokens or _fit(avail / 2 / max(per_row, 1), ALIGN_TOKENS, n_live), n_live)
    vc2 = min(opts.chunk_vocab or _fit((avail - tc * per_row) / (bytes_per_element * tc + per_col), ALIGN_VOCAB,
                                       vocab, MIN_COLS), vocab)
    return BackwardPlan(order, passes, n_live, vocab, hdim, vc, tc, vc2, budget)


def write_rows(dh: torch.Tensor, acc: torch.Tensor, live_idx: torch.Tensor | None, ts: int, block: int) -> None:
    """``dh[rows of live tokens ts..] = acc`` in dh's dtype; through a temporary of at most ``block`` rows."""
    if live_idx is None:
        dh[ts:ts + acc.shape[0]].copy_(acc)
        return
    for r0 in range(0, acc.shape[0], block):
        part = acc[r0:r0 + block]
        dh.index_copy_(0, live_idx[ts + r0:ts + r0 + part.shape[0]], part.to(dh.dtype))


def chunked_backward(hidden2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, opts: LogpsOptions,
                     need_dh: bool, need_dw: bool, need_db: bool, producer: GradLogitsProducer):
    """Returns ``(dH [N, H] in hidden's dtype, dW [V, H] in weight's dtype, db [V] float32)``, None where not
    needed. ``targets`` is ``[N]`` with ``-1`` at dead tokens, ``g`` the per-token upstream gradient. ``weight``
    may be float32 under bf16 / fp16 hidden states (master weights): its chunks are rounded to the hidden
    states' dtype as they are used, and ``dW`` is written straight in float32 (float32 accumulation inside the
    GEMM, one rounding)."""
    n_tok, hdim = hidden2d.shape
    vocab = weight.shape[0]
    dev = hidden2d.device
    live = targets >= 0
    # The one host sync of the backward: the number of live tokens sizes every chunk.
    live_idx = live.nonzero().squeeze(1)
    n = live_idx.numel()
    dh = torch.empty(n_tok, hdim, dtype=hidden2d.dtype, device=dev) if need_dh else None
    dw = torch.empty(vocab, hdim, dtype=weight.dtype, device=dev) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    if n == 0:
        for t in (dh, dw):
            if t is not None:
                t.zero_()
        return dh, dw, db
    compact = n < n_tok
    if compact:
        tgt, lse_c, g_c = targets[live_idx], lse[live_idx], g[live_idx].float()
        hc = (dh if need_dh else torch.empty(n, hdim, dtype=hidden2d.dtype, device=dev))[:n]
        torch.index_select(hidden2d, 0, live_idx, out=hc)
    else:
        tgt, lse_c, g_c = targets.contiguous(), lse.contiguous(), g.float().contiguous()
        hc, live_idx = hidden2d, None
    cast = weight.dtype != hidden2d.dtype  # float32 master weights: GEMM operands are rounded chunk by chunk
    plan = plan_backward(n, n_tok, vocab, hdim, hidden2d.dtype.itemsize, producer.bytes_per_element, opts,
                         need_dh, need_dw, need_db, weight_itemsize=weight.dtype.itemsize,
                         cast_itemsize=hidden2d.dtype.itemsize if cast else 0)
    rows_block = max(1, plan.budget // 4 // (hdim * hidden2d.dtype.itemsize))

    with exact_matmul(dev):
        if plan.order == "vocab-outer":
            # dH's float32 accumulator: dH itself for float32 inputs that needed no gathering
            acc_h = dh if (live_idx is None and dh.dtype == torch.float32) else \
                torch.empty(n, hdim, dtype=torch.float32, device=dev)
            _vocab_pass(plan, hc, weight, tgt, lse_c, g_c, producer, dw=dw, acc_h=acc_h, db=db)
            if acc_h is not dh:
                write_rows(dh, acc_h, live_idx, 0, rows_block)
                del acc_h
        elif plan.order == "token-outer":
            # a float32 dW is its own accumulator
            acc_w = dw.zero_() if dw.dtype == torch.float32 else torch.zeros(vocab, hdim, dtype=torch.float32, device=dev)
            _token_pass(plan, hc, weight, tgt, lse_c, g_c, producer, dh=dh, live_idx=live_idx, acc_w=acc_w, db=db,
                        rows_block=rows_block)
            if acc_w is not dw:
                dw.copy_(acc_w)
            del acc_w
        else:
            db_done = False
            if "vocab" in plan.passes:
                _vocab_pass(plan, hc, weight, tgt, lse_c, g_c, producer, dw=dw, acc_h=None, db=db)
                db_done = True
            if "token" in plan.passes:
                _token_pass(plan, hc, weight, tgt, lse_c, g_c, producer, dh=dh, live_idx=live_idx, acc_w=None,
                            db=None if db_done else db, rows_block=rows_block)
    if need_dh and live_idx is not None:
        dh.masked_fill_(~live[:, None], 0.0)  # rows of dead tokens still hold gathered hidden states
    return dh, dw, db


def _buffers(producer, elements: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A pass's dz chunk buffer and the producer's scratch of the same size; freed when the pass returns."""
    dz = torch.empty(elements, dtype=producer.dz_dtype, device=device)
    scratch = torch.empty(elements, dtype=producer.scratch_dtype, device=device) if producer.scratch_dtype else None
    return dz, scratch


def cast_buffer(weight: torch.Tensor, hc: torch.Tensor, cols: int) -> torch.Tensor | None:
    """The pass's buffer for rounded weight chunks of a float32 master head (None when no rounding is needed)."""
    if weight.dtype == hc.dtype:
        return None
    return torch.empty(min(cols, weight.shape[0]) * weight.shape[1], dtype=hc.dtype, device=hc.device)


def _chunk(bufs, rows: int, cols: int):
    dz_buf, scratch = bufs
    return dz_buf[: rows * cols].view(rows, cols), scratch[: rows * cols] if scratch is not None else None


def _vocab_pass(plan, hc, weight, tgt, lse, g, producer, *, dw, acc_h, db):
    n = plan.n_live
    bufs = _buffers(producer, plan.dz_elements("vocab"), hc.device)
    w_buf = cast_buffer(weight, hc, plan.vocab_chunk)
    for vs in range(0, plan.vocab, plan.vocab_chunk):
        ve = min(vs + plan.vocab_chunk, plan.vocab)
        dz, scratch = _chunk(bufs, n, ve - vs)
        w_c = operand_chunk(weight, vs, ve, hc.dtype, w_buf)
        producer(hc, tgt, lse, g, vs, ve, dz, db[vs:ve] if db is not None else None, scratch, w_c)
        if dw is not None:
            mm_into(dw[vs:ve], dz.T, hc)  # one GEMM over all live tokens, written once in the weight's dtype
        if acc_h is not None:
            (mm_into if vs == 0 else addmm_f32)(acc_h, dz, w_c)


def _token_pass(plan, hc, weight, tgt, lse, g, producer, *, dh, live_idx, acc_w, db, rows_block):
    n, hdim, tc = plan.n_live, plan.hdim, plan.token_chunk
    bufs = _buffers(producer, plan.dz_elements("token"), hc.device)
    w_buf = cast_buffer(weight, hc, plan.token_vocab_chunk)
    direct = dh is not None and live_idx is None and dh.dtype == torch.float32
    acc_buf = (torch.empty(min(tc, n) * hdim, dtype=torch.float32, device=hc.device)
               if dh is not None and not direct else None)
    for ts in reversed(range(0, n, tc)):  # last chunk first: see the module docstring
        te = min(ts + tc, n)
        rows = te - ts
        hct = hc[ts:te]
        acc = None
        if dh is not None:
            acc = dh[ts:te] if direct else acc_buf[: rows * hdim].view(rows, hdim)
        for vs in range(0, plan.vocab, plan.token_vocab_chunk):
            ve = min(vs + plan.token_vocab_chunk, plan.vocab)
            dz, scratch = _chunk(bufs, rows, ve - vs)
            w_c = operand_chunk(weight, vs, ve, hct.dtype, w_buf)
            producer(hct, tgt[ts:te], lse[ts:te], g[ts:te], vs, ve, dz, db[vs:ve] if db is not None else None,
                     scratch, w_c)
            if acc is not None:
                (mm_into if vs == 0 else addmm_f32)(acc, dz, w_c)
            if acc_w is not None:
                addmm_f32(acc_w[vs:ve], dz.T, hct)
        if acc is not None and not direct:
            write_rows(dh, acc, live_idx, ts, rows_block)
