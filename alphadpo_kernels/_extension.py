"""The optional compiled epilogues (``csrc/``): import, availability, and checked calls.

Every wrapper validates what the C++/CUDA side assumes (float32 logits with unit column stride, int64 targets
and float32 per-row vectors, contiguous, on the logits' device, with matching lengths) before passing raw
pointers, so a mistake raises a ``ValueError`` naming the argument instead of reading out of bounds.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch


@functools.cache
def _load(name: str):
    try:
        return importlib.import_module(f"alphadpo_kernels.{name}")
    except ImportError:
        return None


def cpu_module():
    return _load("_C")


def cuda_module():
    return _load("_C_cuda")


def _check(logits: torch.Tensor, targets: torch.Tensor, vectors: dict[str, torch.Tensor]) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D float32 tensor, got {getattr(logits, 'dtype', type(logits))} "
                         f"{tuple(getattr(logits, 'shape', ()))}")
    if logits.stride(1) != 1 or logits.stride(0) < logits.shape[1]:
        raise ValueError(f"logits must have unit column stride and non-overlapping rows, got strides {logits.stride()}")
    n = logits.shape[0]
    if targets.dtype != torch.int64 or tuple(targets.shape) != (n,) or not targets.is_contiguous():
        raise ValueError(f"targets must be a contiguous int64 tensor of shape ({n},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    for name, t in {"targets": targets, **vectors}.items():
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
    for name, t in vectors.items():
        if t.dtype != torch.float32 or tuple(t.shape) != (n,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape ({n},), got {t.dtype} "
                             f"{tuple(t.shape)}")


def _module_for(logits: torch.Tensor):
    mod = cuda_module() if logits.is_cuda else cpu_module()
    if mod is None:
        kind = "CUDA (alphadpo_kernels._C_cuda)" if logits.is_cuda else "CPU (alphadpo_kernels._C)"
        raise RuntimeError(f"the {kind} extension is not built; reinstall with a compiler (and nvcc for CUDA)")
    return mod


def _tail(logits: torch.Tensor) -> tuple:
    if logits.is_cuda:
        return (torch.cuda.current_stream(logits.device).cuda_stream,)
    return (torch.get_num_threads(),)


def _on_device(logits: torch.Tensor):
    """The kernels launch on the current CUDA device: make it the logits' one for the call."""
    return torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext()


def lse_update(logits, targets, v_offset: int, softcap: float | None, m, s, tz) -> None:
    """Fold a ``[n, v]`` logits chunk (columns ``v_offset..``) into running ``m``, ``s`` and target logits ``tz``.
    Soft-caps ``logits`` in place."""
    _check(logits, targets, {"m": m, "s": s, "tz": tz})
    n, v = logits.shape
    with _on_device(logits):
        _module_for(logits).lse_update(logits.data_ptr(), n, v, logits.stride(0), targets.data_ptr(), int(v_offset),
                                       float(softcap or 0.0), m.data_ptr(), s.data_ptr(), tz.data_ptr(), *_tail(logits))


def grad_logits(logits, targets, v_offset: int, softcap: float | None, lse, g) -> torch.Tensor:
    """Turn a recomputed ``[n, v]`` logits chunk into ``g·(onehot − softmax)·softcap'`` in place; returns it."""
    _check(logits, targets, {"lse": lse, "g": g})
    n, v = logits.shape
    with _on_device(logits):
        _module_for(logits).grad_logits(logits.data_ptr(), n, v, logits.stride(0), targets.data_ptr(), int(v_offset),
                                        float(softcap or 0.0), lse.data_ptr(), g.data_ptr(), *_tail(logits))
    return logits


_OUT_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}


def grad_logits_to(logits, targets, v_offset: int, softcap: float | None, lse, g, out, *, keep: bool) -> None:
    """CUDA only: ``out = g·(onehot − softmax)·softcap'`` of a float32 ``[n, v]`` logits chunk, written once in
    ``out``'s dtype (bfloat16 / float16); with ``keep`` the float32 values also overwrite ``logits``."""
    _check(logits, targets, {"lse": lse, "g": g})
    if not logits.is_cuda:
        raise ValueError("grad_logits_to is CUDA only (the CPU backend keeps dz in float32)")
    if not isinstance(out, torch.Tensor) or out.dtype not in _OUT_DTYPE_CODES or tuple(out.shape) != tuple(logits.shape):
        raise ValueError(f"out must be a bfloat16 or float16 tensor of shape {tuple(logits.shape)}, got "
                         f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
    if out.stride(1) != 1 or out.stride(0) < out.shape[1] or out.device != logits.device:
        raise ValueError(f"out must have unit column stride, non-overlapping rows and be on {logits.device}")
    n, v = logits.shape
    with _on_device(logits):
        _module_for(logits).grad_logits_to(logits.data_ptr(), n, v, logits.stride(0), targets.data_ptr(),
                                           int(v_offset), float(softcap or 0.0), lse.data_ptr(), g.data_ptr(),
                                           out.data_ptr(), out.stride(0), _OUT_DTYPE_CODES[out.dtype], bool(keep),
                                           *_tail(logits))
