"""Forward kernel: per-token log-sum-exp and target logit over vocabulary tiles, logits never stored.

One program owns ``BLOCK_M`` tokens and walks the vocabulary in ``BLOCK_N`` tiles, each tile a
``[BLOCK_M, H] × [H, BLOCK_N]`` product accumulated in float32 over ``BLOCK_K`` slices of H. An online
log-sum-exp (running max and rescaled sum) and the target logit are kept per token; the program writes
``lse`` and ``token_logp = z[y] − lse`` (8 bytes a token). Blocks whose tokens are all dead (prompt,
padding) return at once. The per-row masked sum / mean is a cheap ``[rows, T]`` reduction done by the
caller, which keeps the result deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .instrument import record_gemm
from .options import LogpsOptions
from .triton_common import check_triton_device, dot_flags, logit_tile
from .tuning import resolve_blocks


@triton.jit
def _sequence_logps_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, logp_ptr,
    N, V, H, stride_hn, stride_hk, stride_wv, stride_wk, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    tgt = tl.load(tgt_ptr + offs_m, mask=row_ok, other=-1)
    if tl.max(tgt, axis=0) < 0:  # no live token in this block
        return
    live = row_ok & (tgt >= 0)  # dead rows are never read: garbage there cannot leak into a live row
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_N):
        offs_n = v0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = offs_n < V
        z = logit_tile(h_ptr, w_ptr, b_ptr, offs_m, live, offs_n, col_ok, H,
                       stride_hn, stride_hk, stride_wv, stride_wk, softcap, logit_scale,
                       HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        t_i += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)
    lse = m_i + tl.log(s_i)
    tl.store(lse_ptr + offs_m, lse, mask=live)
    tl.store(logp_ptr + offs_m, t_i - lse, mask=live)


def forward(hidden2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            opts: LogpsOptions, *, lse: torch.Tensor | None = None, token_logps: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns float32 ``(token_logps [N], lse [N])``; entries of dead tokens are left unwritten (the caller
    masks them). ``lse`` / ``token_logps`` may be given as output buffers."""
    check_triton_device(hidden2d)
    n_tok, hdim = hidden2d.shape
    vocab = weight.shape[0]
    opts = resolve_blocks(opts, hidden2d.device, hidden2d.dtype, hdim, vocab)
    if lse is None:
        lse = torch.empty(n_tok, dtype=torch.float32, device=hidden2d.device)
    if token_logps is None:
        token_logps = torch.empty(n_tok, dtype=torch.float32, device=hidden2d.device)
    grid = (triton.cdiv(n_tok, opts.fwd_block_m),)
    record_gemm("triton:forward", n_tok, vocab, hdim)  # token blocks with no live label return at once
    _sequence_logps_fwd_kernel[grid](
        hidden2d, weight, bias if bias is not None else weight, targets, lse, token_logps,
        n_tok, vocab, hdim, hidden2d.stride(0), hidden2d.stride(1), weight.stride(0), weight.stride(1),
        float(opts.softcap or 1.0), float(opts.logit_scale),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
        BLOCK_M=opts.fwd_block_m, BLOCK_N=opts.fwd_block_n, BLOCK_K=opts.fwd_block_k,
        **dot_flags(hidden2d.dtype, hidden2d.device),
        num_warps=opts.num_warps, num_stages=opts.num_stages,
    )
    return token_logps, lse
