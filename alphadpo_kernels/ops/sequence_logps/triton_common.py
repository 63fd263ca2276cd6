"""Pieces shared by the Triton forward and backward kernels."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {t.device}); on CPU use backend='torch' or "
            "'auto', or set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter"
        )


def launch_device(t: torch.Tensor):
    """The context every Triton launch runs in: the tensors' own CUDA device made current. Triton's launcher
    takes the current device's stream and context, so a head placed on another card (``device_map="auto"``)
    would otherwise receive that card's pointers on the wrong device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the interpreter: 132, an H100/H200, so grids are sized alike)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132


def dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    """fp32 inputs use IEEE dots (no TF32) so that exactness holds; the interpreter's native bf16 dot is
    wrong, so there bf16/fp16 tiles are upcast to fp32 first, which is exact since their products are."""
    return {
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST_DOT": device.type != "cuda",
    }


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def as_operand(w, dtype: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """A weight tile in the hidden states' ``dtype`` (float32 master weights under bf16 / fp16 hidden states),
    rounded to nearest-even as torch's ``.to`` (and autocast) round the whole head. The interpreter's own
    float32 → bfloat16 conversion is not round-to-nearest-even, so there (``UPCAST_DOT``, where tiles are upcast
    for the dot anyway) the bfloat16 value is formed exactly in float32 bits instead."""
    if UPCAST_DOT and dtype == tl.bfloat16 and w.dtype == tl.float32:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return w.to(dtype)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's ``(row block, column block)`` in grouped order: GROUP_M row blocks sweep the columns
    together, so each W tile is read from L2 by several programs in a row."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_size = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    in_group = pid % (GROUP_M * num_n)
    return first_m + in_group % group_size, in_group // group_size


@triton.jit
def grad_logit_tile(z, p, is_target, g, row_ok, col_ok, softcap, HAS_SOFTCAP: tl.constexpr):
    """``dz = g·(onehot − p)`` (× the soft-cap derivative ``1 − (z/c)²``) of a logit tile, zero outside
    ``row_ok × col_ok``; ``z`` is the (soft-capped) logit tile, ``p = exp(z − lse)``."""
    dz = g[:, None] * (is_target.to(tl.float32) - p)
    if HAS_SOFTCAP:
        zc = tl.where(col_ok[None, :], z / softcap, 0.0)
        dz = dz * (1.0 - zc * zc)
    return tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)


@triton.jit
def tanh(x):
    # exp form: portable to the interpreter and every backend; exact to fp32 rounding of the exp.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def logit_tile(
    h_ptr, w_ptr, b_ptr, offs_m, row_ok, offs_n, col_ok, H, stride_hn, stride_hk, stride_wv, stride_wk, softcap,
    logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """float32 ``[BLOCK_M, BLOCK_N]`` tile of logits ``softcap(logit_scale · (h·Wᵀ + b))``; ``-inf`` in columns past V.
    ``W`` may be stored in a wider dtype than ``h`` (float32 master weights): its tiles are cast to ``h``'s.

    ``offs_m`` / ``offs_n`` are int64 so that ``row × stride`` cannot overflow at long context.
    """
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        h = tl.load(h_ptr + offs_m[:, None] * stride_hn + offs_k[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # a float32 master head under bf16 / fp16 hidden states is rounded tile by tile as it is loaded, as
        # autocast rounds the whole head for the plain LM head: no weight-sized copy is ever made
        w = tl.load(w_ptr + offs_n[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        w = as_operand(w, h_ptr.dtype.element_ty, UPCAST_DOT)
        acc = dot(h, tl.trans(w), acc, DOT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * logit_scale  # families that scale their logits (Cohere, Granite); 1.0 elsewhere
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return tl.where(col_ok[None, :], acc, float("-inf"))
