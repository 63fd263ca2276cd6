"""Opt-in backward with tile skipping (``LogpsOptions(filter_eps=...)``): the one kernel that keeps atomics.

Skipping needs the product of each ``dz`` tile to be decided tile by tile, which dense cuBLAS GEMMs cannot do; so
this path folds each ``[BLOCK_M, BLOCK_N]`` tile into ``dH`` and ``dW`` itself, Cut Cross-Entropy's shape. It is
the slow shape when nothing is skipped (docs/design.md §2: about ``N·H·V·(1/BLOCK_N + 1/BLOCK_M)`` float adds through
L2), so it only runs when skipping is asked for; the default backward is chunked_backward.py.

Only live tokens take part: their hidden rows are gathered (into dH's own buffer) as chunked_backward.py does, so
the float32 dH accumulator holds live rows only and the path keeps the fast mode's memory bound.
The launcher walks the vocabulary in chunks (``chunk_vocab`` rows, else what the memory budget allows), one
launch each, so that the float32 ``dW`` accumulator is one chunk, cast into the weight's dtype before the next
launch; ``dH`` is one float32 ``[N, H]`` buffer across launches. Within a launch the grid is (token blocks ×
vocabulary tiles), visited in L2-friendly groups of ``GROUP_M`` token blocks.
Program (m, n) recomputes the float32 logit tile ``z`` from the saved per-token ``lse`` and forms

    dz = g_tok · (onehot(y) − exp(z − lse))          (× (1 − tanh²(z/c)) with a soft-cap)

in registers, then for each ``BLOCK_K`` slice of H adds ``dz · W[n, k]`` into ``dH[m, k]`` and
``dzᵀ · H[m, k]`` into ``dW[n, k]`` with relaxed atomic adds (no ordering is needed between independent
float adds; the default ``acq_rel`` would put a GPU-wide memory barrier around each one). ``dz`` is rounded to
the input dtype before the two products, as a bf16 GEMM would see it. Token blocks whose upstream gradient is all
zero (prompt, padding) return at once.

Skipping (``FILTER``): when every softmax entry of the tile is below ``filter_eps`` and no live token's target
falls in it, the program stops after the recompute and skips the dH / dW / dbias products (two of the backward's
three GEMM units for that tile). Each skipped entry is below the threshold, but their sum over a long vocabulary
tail is not bounded, hence opt-in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked_backward import PER_TOKEN_BYTES, write_rows
from .instrument import record_gemm
from .options import LogpsOptions
from .triton_common import as_operand, check_triton_device, dot, dot_flags, grad_logit_tile, grouped_tile, launch_device, logit_tile
from .tuning import arch_major, fit_stages, resolve_blocks


@triton.jit
def _skip_backward_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr, skip_count_ptr,
    N, V, V_OFFSET, H, stride_hn, stride_hk, stride_wv, stride_wk, softcap, logit_scale, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr, COUNT_SKIPS: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(N, V, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    g = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0)
    if tl.max(tl.abs(g), axis=0) == 0.0:  # no gradient reaches these tokens
        return
    tgt = tl.load(tgt_ptr + offs_m, mask=row_ok, other=-1)
    # Dead rows of a live block (prompt, padding) are treated as absent: never read, so garbage hidden
    # states there (NaN, inf) cannot reach dz, dH or dW.
    live = row_ok & (tgt >= 0)
    lse = tl.load(lse_ptr + offs_m, mask=live, other=0.0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < V

    z = logit_tile(h_ptr, w_ptr, b_ptr, offs_m, live, offs_n, col_ok, H,
                   stride_hn, stride_hk, stride_wv, stride_wk, softcap, logit_scale,
                   HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    p = tl.exp(z - lse[:, None])  # 0 in columns past V (z = -inf)
    is_target = (offs_n + V_OFFSET)[None, :] == tgt[:, None]
    if FILTER:
        p_max = tl.max(tl.max(tl.where(live[:, None], p, 0.0), axis=1), axis=0)
        n_targets = tl.sum(tl.sum(is_target.to(tl.int32), axis=1), axis=0)
        if (p_max < filter_eps) & (n_targets == 0):
            if COUNT_SKIPS:
                tl.atomic_add(skip_count_ptr, 1, sem="relaxed")
            return
    dz = grad_logit_tile(z, p, is_target, g, live, col_ok, softcap, HAS_SOFTCAP)
    if NEED_DB:
        tl.atomic_add(db_ptr + offs_n, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
    dz_in = dz.to(h_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        if NEED_DH:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            w = as_operand(w, h_ptr.dtype.element_ty, UPCAST_DOT)
            dh = dot(dz_in, w, tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
            # dead rows are left alone (the caller's zeros), even where a head entry is inf and 0·inf is NaN
            tl.atomic_add(dh_ptr + offs_m[:, None] * H + offs_k[None, :], dh,
                          mask=live[:, None] & k_ok[None, :], sem="relaxed")
        if NEED_DW:
            h = tl.load(h_ptr + offs_m[:, None] * stride_hn + offs_k[None, :] * stride_hk,
                        mask=live[:, None] & k_ok[None, :], other=0.0)
            dw = dot(tl.trans(dz_in), h, tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(dw_ptr + offs_n[:, None] * H + offs_k[None, :], dw,
                          mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


def skip_tiles(opts: LogpsOptions, h_itemsize: int = 2, w_itemsize: int = 2, major: int = 8) -> dict:
    """This kernel keeps a dz tile live across both gradient products, so its tiles are capped below the dz
    kernel's: at most 64 tokens × 128 vocabulary entries × 64 of H, 8 warps and three stages, fewer stages with a
    float32 master head where shared memory needs (checked by compile_check.py: tensor cores without spills in
    bf16 / fp16, shared memory within the card's limit in every dtype)."""
    bm, bn, bk = min(opts.bwd_block_m, 64), min(opts.bwd_block_n, 128), min(opts.bwd_block_k, 64)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=opts.bwd_group_m, num_warps=min(opts.bwd_num_warps, 8),
                num_stages=fit_stages(min(opts.bwd_num_stages, 3), bm, bn, bk, h_itemsize, w_itemsize, major))


def skip_backward(hidden2d, weight, bias, targets, lse, g, opts: LogpsOptions, need_dh, need_dw, need_db, *,
             skip_count: torch.Tensor | None = None):
    """Returns ``(dH [N, H] in hidden's dtype, dW [V, H] in weight's dtype, db [V] float32)``, None where
    not needed. ``skip_count`` (an int32 ``[1]`` tensor) counts the tiles skipped by filtering."""
    check_triton_device(hidden2d)
    n_tok, hdim = hidden2d.shape
    vocab = weight.shape[0]
    opts = resolve_blocks(opts, hidden2d.device, hidden2d.dtype, hdim, vocab)
    tiles = skip_tiles(opts, hidden2d.element_size(), weight.element_size(), arch_major(hidden2d.device))
    dev = hidden2d.device
    # Only live tokens take part, gathered as chunked_backward.py does (its one host sync: the live count sizes
    # the buffers): the float32 dH accumulator then holds N_live rows, not N, and dead rows are never read.
    live_idx = (targets >= 0).nonzero().squeeze(1)
    n = live_idx.numel()
    dh = torch.empty(n_tok, hdim, dtype=hidden2d.dtype, device=dev) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    if n == 0:
        return (dh.zero_() if need_dh else None), (dw.zero_() if need_dw else None), db
    compact = n < n_tok
    if compact:  # the live rows go into dH's own buffer (part of the floor), as in chunked_backward
        hc = (dh if need_dh else torch.empty(n, hdim, dtype=hidden2d.dtype, device=dev))[:n]
        torch.index_select(hidden2d, 0, live_idx, out=hc)
        tgt, lse_c, g_c = targets[live_idx], lse[live_idx].contiguous(), g[live_idx].float()
    else:
        hc, tgt, lse_c, g_c = hidden2d, targets.contiguous(), lse.contiguous(), g.float().contiguous()
    acc_h = torch.zeros(n, hdim, dtype=torch.float32, device=dev) if need_dh else None
    # rows of the float32 dW chunk: what the budget holds, whole tiles
    bn = tiles["BLOCK_N"]
    # (the per-token vectors of the backward come out of the same budget, as in chunked_backward)
    chunk = opts.chunk_vocab or max(bn, (opts.budget_bytes() - PER_TOKEN_BYTES * n_tok) // (4 * hdim))
    chunk = min(max(bn, chunk // bn * bn), -(-vocab // bn) * bn)  # whole tiles, within the budget
    dw_acc = torch.empty(min(chunk, vocab), hdim, dtype=torch.float32, device=dev) if need_dw else None
    flags = dot_flags(hidden2d.dtype, dev)
    eps = opts.filter_threshold(hidden2d.dtype)
    for vs in range(0, vocab, chunk):
        ve = min(vs + chunk, vocab)
        w_c = weight[vs:ve]
        if need_dw:
            acc = dw_acc[: ve - vs]
            acc.zero_()
        grid = (triton.cdiv(n, tiles["BLOCK_M"]) * triton.cdiv(ve - vs, bn),)
        record_gemm("triton:skip_backward", n, ve - vs, hdim * (1 + need_dh + need_dw))
        with launch_device(hidden2d):
            _skip_backward_kernel[grid](
                hc, w_c, bias[vs:ve] if bias is not None else w_c, tgt, lse_c, g_c,
                acc_h if need_dh else lse_c, acc if need_dw else lse_c, db[vs:ve] if need_db else lse_c,
                skip_count if skip_count is not None else tgt,
                n, ve - vs, vs, hdim, hc.stride(0), hc.stride(1), weight.stride(0), weight.stride(1),
                float(opts.softcap or 1.0), float(opts.logit_scale), float(eps or 0.0),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
                FILTER=eps is not None, COUNT_SKIPS=skip_count is not None,
                NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
                **tiles, **flags,
            )
        if need_dw:
            dw[vs:ve].copy_(acc)
    acc = dw_acc = None  # released before dH's rows are written: the chunk must not add to that peak
    if need_dh:
        if compact:
            write_rows(dh, acc_h, live_idx, 0, max(1, opts.budget_bytes() // 4 // (hdim * dh.element_size())))
            dh.masked_fill_((targets < 0)[:, None], 0.0)  # rows of dead tokens still hold gathered hidden states
        else:
            dh.copy_(acc_h)
    return dh, dw, db
