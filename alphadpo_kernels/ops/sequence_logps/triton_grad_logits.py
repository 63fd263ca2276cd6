"""The backward's ``dz`` producer for ``backend="triton"``: recompute a logit chunk and write its gradient.

One program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``dz[rows, vs:ve]``: it recomputes the float32 logits with
``tl.dot`` over ``BLOCK_K`` slices of H (tensor cores in bf16 / fp16, IEEE dots in float32) and writes

    dz = g · (onehot(y) − exp(z − lse))          (× (1 − tanh²(z/c)) with a soft-cap)

once, in ``dz``'s dtype (the input dtype: the operand of the two gradient GEMMs that follow). Nothing is
accumulated here, so there are no atomics: the driver (chunked_backward.py) hands the chunk to cuBLAS. With a
bias, each program also writes its tile's float32 column sums to its own row of a ``[row blocks, chunk]``
buffer, summed by the caller: deterministic, and exact in float32 whatever dz's dtype.
Tiles are visited in groups of ``GROUP_M`` row blocks so that each W tile is reused from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .instrument import record_gemm
from .options import LogpsOptions
from .triton_common import check_triton_device, dot_flags, grad_logit_tile, grouped_tile, launch_device, logit_tile
from .tuning import resolve_blocks


@triton.jit
def _grad_logits_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dz_ptr, dbp_ptr,
    M, VC, V_OFFSET, H, stride_hm, stride_hk, stride_wv, stride_wk, stride_dzm, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, VC, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < VC
    tgt = tl.load(tgt_ptr + offs_m, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0)

    z = logit_tile(h_ptr, w_ptr, b_ptr, offs_m, row_ok, offs_n, col_ok, H,
                   stride_hm, stride_hk, stride_wv, stride_wk, softcap, logit_scale,
                   HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    p = tl.exp(z - lse[:, None])  # 0 in columns past the chunk (z = -inf)
    is_target = (offs_n + V_OFFSET)[None, :] == tgt[:, None]
    dz = grad_logit_tile(z, p, is_target, g, row_ok, col_ok, softcap, HAS_SOFTCAP)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(dz_ptr + offs_m[:, None] * stride_dzm + offs_n[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)
    if NEED_DB:
        tl.store(dbp_ptr + pid_m.to(tl.int64) * VC + offs_n, tl.sum(dz, axis=0), mask=col_ok)


def db_partials(rows: int, cols: int, opts: LogpsOptions, device) -> torch.Tensor:
    return torch.empty(triton.cdiv(rows, opts.bwd_block_m), cols, dtype=torch.float32, device=device)


class TritonGradLogits:
    """``dz`` for rows of the (compacted) hidden states and one vocabulary chunk, by :func:`_grad_logits_kernel`.

    ``dz`` has the input dtype: half-precision tensor-core GEMMs take it as it is, and in float32 it is exact.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, opts: LogpsOptions, dtype: torch.dtype):
        opts = resolve_blocks(opts, weight.device, dtype, weight.shape[1], weight.shape[0])
        self.weight, self.bias, self.opts = weight, bias, opts
        self.dz_dtype, self.scratch_dtype = dtype, None
        # bytes per dz element the driver must budget for: dz itself, plus the bias partial sums
        self.bytes_per_element = dtype.itemsize + (4 / opts.bwd_block_m if bias is not None else 0.0)

    def __call__(self, hc, tgt, lse, g, vs: int, ve: int, dz: torch.Tensor, db: torch.Tensor | None,
                 scratch: None = None, w_c: torch.Tensor | None = None) -> None:
        """Fill ``dz [rows, ve − vs]``; add the chunk's column sums of float32 dz into ``db [ve − vs]``.
        ``w_c``: the chunk's weight rows as the driver holds them (else read from the weight; a float32 weight
        is rounded to ``hc``'s dtype tile by tile in the kernel)."""
        check_triton_device(hc)
        opts, rows, cols = self.opts, hc.shape[0], ve - vs
        w_c = self.weight[vs:ve] if w_c is None else w_c
        need_db = db is not None
        part = db_partials(rows, cols, opts, hc.device) if need_db else None
        grid = (triton.cdiv(rows, opts.bwd_block_m) * triton.cdiv(cols, opts.bwd_block_n),)
        record_gemm("triton:grad_logits", rows, cols, hc.shape[1])
        with launch_device(hc):
            _grad_logits_kernel[grid](
                hc, w_c, self.bias[vs:ve] if self.bias is not None else w_c, tgt, lse, g, dz,
                part if need_db else lse,
                rows, cols, vs, hc.shape[1], hc.stride(0), hc.stride(1), w_c.stride(0), w_c.stride(1), dz.stride(0),
                float(opts.softcap or 1.0), float(opts.logit_scale),
                HAS_BIAS=self.bias is not None, HAS_SOFTCAP=opts.softcap is not None, NEED_DB=need_db,
                BLOCK_M=opts.bwd_block_m, BLOCK_N=opts.bwd_block_n, BLOCK_K=opts.bwd_block_k,
                GROUP_M=opts.bwd_group_m, **dot_flags(hc.dtype, hc.device), num_warps=opts.bwd_num_warps,
                num_stages=opts.bwd_num_stages,
            )
        if need_db:
            db += part.sum(0)
