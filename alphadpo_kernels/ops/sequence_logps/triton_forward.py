"""Forward kernel: per-token log-sum-exp and target logit over vocabulary tiles, logits never stored.

The work is the GEMM ``[N, H] × [H, V]`` with a row-wise epilogue, so the grid is shaped like a GEMM's:
programs run over (row block of ``BLOCK_M`` tokens, vocabulary split of ``TILES_PER_SPLIT`` tiles of
``BLOCK_N``), visited in groups of ``GROUP_M`` row blocks that sweep every split together. Each tile is a
``[BLOCK_M, H] × [H, BLOCK_N]`` product accumulated in float32 over ``BLOCK_K`` slices of H, folded into an
online log-sum-exp (running max and rescaled sum) and the target logit. A program writes its split's partial
``(max, sum-exp, target logit)`` per token (12 bytes a token a split); a small merge kernel combines the splits
into ``lse`` and ``token_logp = z[y] − lse``.

Why splits: with one program per row block walking the whole vocabulary (the textbook shape), each program
re-reads its ``[BLOCK_M, H]`` hidden block for every one of the ``V / BLOCK_N`` tiles, and the row blocks that
run at once hold far more hidden state than L2 does: ``N·H·2·V/BLOCK_N`` bytes of HBM traffic, about 128 GB at
N = 16k on a Llama-3 head, more time than the GEMM's own arithmetic on an H200. It also leaves the card
half-empty below N = 16k (one program a row block). Here a group of ``GROUP_M`` row blocks × all splits is about
one wave of the card: the group's hidden blocks stay in L2 while every split re-reads them, and each weight
tile is read from HBM once per group and shared by its ``GROUP_M`` row blocks in L2. HBM traffic is then about
``N·H·2 + (N / (BLOCK_M·GROUP_M))·V·H·2`` bytes (``benchmarks/compile_check.py`` prints it per configuration),
and the grid has ``row blocks × splits`` programs: several waves from N = 4k.

Blocks whose tokens are all dead (prompt, padding) return at once. The per-row masked sum / mean is a cheap
reduction done by the caller, which keeps the result deterministic (the merge is a fixed-order loop too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .instrument import record_gemm
from .options import LogpsOptions
from .triton_common import check_triton_device, dot_flags, grouped_tile, launch_device, logit_tile, sm_count
from .tuning import arch_major, fit_stages, resolve_blocks

MIN_TILES_PER_SPLIT = 4  # below this a split's partials (12 bytes a token) cost more than they save
MERGE_BLOCK = 1024


@triton.jit
def _sequence_logps_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr,
    N, V, H, TILES_PER_SPLIT, stride_hn, stride_hk, stride_wv, stride_wk, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    splits = tl.cdiv(tl.cdiv(V, BLOCK_N), TILES_PER_SPLIT)
    pid_m, pid_s = grouped_tile(N, splits, BLOCK_M, 1, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    tgt = tl.load(tgt_ptr + offs_m, mask=row_ok, other=-1)
    if tl.max(tgt, axis=0) < 0:  # no live token in this block: its partials are never read
        return
    live = row_ok & (tgt >= 0)  # dead rows are never read: garbage there cannot leak into a live row
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_begin = pid_s * TILES_PER_SPLIT * BLOCK_N
    v_end = tl.minimum(v_begin + TILES_PER_SPLIT * BLOCK_N, V)
    for v0 in range(v_begin, v_end, BLOCK_N):
        offs_n = v0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = offs_n < V
        z = logit_tile(h_ptr, w_ptr, b_ptr, offs_m, live, offs_n, col_ok, H,
                       stride_hn, stride_hk, stride_wv, stride_wk, softcap, logit_scale,
                       HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        t_i += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)
    # part is float32 [3, splits, N]: every split holds at least one column, so m_i is finite on live rows
    # (3·splits·N < 2³¹, checked by the launcher, so these int32 products cannot overflow)
    out = part_ptr + pid_s * N + offs_m
    split_stride = splits * N
    tl.store(out, m_i, mask=live)
    tl.store(out + split_stride, s_i, mask=live)
    tl.store(out + 2 * split_stride, t_i, mask=live)


@triton.jit
def _merge_splits_kernel(part_ptr, tgt_ptr, lse_ptr, logp_ptr, N, SPLITS, BLOCK: tl.constexpr):
    """``lse = M + log Σ_s S_s·exp(m_s − M)`` with ``M = max_s m_s``, and ``logp = Σ_s t_s − lse``, over the
    splits in a fixed order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = (offs < N) & (tl.load(tgt_ptr + offs, mask=offs < N, other=-1) >= 0)
    split_stride = SPLITS * N  # < 2³¹, checked by the launcher
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for s in range(0, SPLITS):
        m = tl.maximum(m, tl.load(part_ptr + s * N + offs, mask=live, other=float("-inf")))
    total = tl.zeros([BLOCK], dtype=tl.float32)
    target = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        m_s = tl.load(part_ptr + s * N + offs, mask=live, other=0.0)
        s_s = tl.load(part_ptr + split_stride + s * N + offs, mask=live, other=0.0)
        total += s_s * tl.exp(m_s - tl.where(live, m, 0.0))
        target += tl.load(part_ptr + 2 * split_stride + s * N + offs, mask=live, other=0.0)
    lse = m + tl.log(tl.where(live, total, 1.0))
    tl.store(lse_ptr + offs, lse, mask=live)
    tl.store(logp_ptr + offs, target - lse, mask=live)


def plan_splits(n_tok: int, vocab: int, opts: LogpsOptions, device: torch.device) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` of the forward grid for resolved ``opts``.

    Unless ``opts.fwd_splits`` fixes it: as many splits as make one group (``fwd_group_m`` row blocks × the
    splits) about one wave of the card, at least enough programs for two waves when N is small, and at least
    ``MIN_TILES_PER_SPLIT`` tiles a split."""
    tiles = triton.cdiv(vocab, opts.fwd_block_n)
    if opts.fwd_splits is not None:
        splits = opts.fwd_splits
    else:
        sms = sm_count(device)
        row_blocks = triton.cdiv(n_tok, opts.fwd_block_m)
        splits = max(sms // max(1, min(opts.fwd_group_m, row_blocks)), triton.cdiv(2 * sms, max(row_blocks, 1)))
        splits = min(splits, max(1, tiles // MIN_TILES_PER_SPLIT))
    per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    return triton.cdiv(tiles, per_split), per_split


def stages(opts: LogpsOptions, hidden2d: torch.Tensor, weight: torch.Tensor) -> int:
    """The forward's pipeline depth: ``fwd_num_stages``, fewer for a float32 master head if shared memory needs."""
    return fit_stages(opts.fwd_num_stages, opts.fwd_block_m, opts.fwd_block_n, opts.fwd_block_k,
                      hidden2d.element_size(), weight.element_size(), arch_major(hidden2d.device))


def forward(hidden2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            opts: LogpsOptions, *, lse: torch.Tensor | None = None, token_logps: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns float32 ``(token_logps [N], lse [N])``; entries of dead tokens are left unwritten (the caller
    masks them). ``lse`` / ``token_logps`` may be given as output buffers. ``weight`` may be float32 under
    bf16 / fp16 ``hidden2d`` (float32 master weights): its tiles are cast as they are loaded."""
    check_triton_device(hidden2d)
    n_tok, hdim = hidden2d.shape
    vocab = weight.shape[0]
    dev = hidden2d.device
    opts = resolve_blocks(opts, dev, hidden2d.dtype, hdim, vocab)
    if lse is None:
        lse = torch.empty(n_tok, dtype=torch.float32, device=dev)
    if token_logps is None:
        token_logps = torch.empty(n_tok, dtype=torch.float32, device=dev)
    splits, per_split = plan_splits(n_tok, vocab, opts, dev)
    if 3 * splits * n_tok >= 2**31:
        raise ValueError(f"{n_tok} tokens × {splits} vocabulary splits exceed the forward's int32 partial-sum "
                         "indexing; pass LogpsOptions(fwd_splits=...) with fewer splits")
    part = torch.empty(3, splits, n_tok, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(n_tok, opts.fwd_block_m) * splits,)
    record_gemm("triton:forward", n_tok, vocab, hdim)  # token blocks with no live label return at once
    with launch_device(hidden2d):
        _sequence_logps_fwd_kernel[grid](
            hidden2d, weight, bias if bias is not None else weight, targets, part,
            n_tok, vocab, hdim, per_split, hidden2d.stride(0), hidden2d.stride(1), weight.stride(0),
            weight.stride(1), float(opts.softcap or 1.0), float(opts.logit_scale),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
            BLOCK_M=opts.fwd_block_m, BLOCK_N=opts.fwd_block_n, BLOCK_K=opts.fwd_block_k, GROUP_M=opts.fwd_group_m,
            **dot_flags(hidden2d.dtype, dev), num_warps=opts.fwd_num_warps, num_stages=stages(opts, hidden2d, weight),
        )
        _merge_splits_kernel[(triton.cdiv(n_tok, MERGE_BLOCK),)](part, targets, lse, token_logps, n_tok, splits,
                                                                  BLOCK=MERGE_BLOCK, num_warps=4)
    return token_logps, lse
