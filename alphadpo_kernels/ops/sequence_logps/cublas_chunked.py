"""``backend="cublas"``: cuBLAS GEMMs (float32 output) and the CUDA epilogues of ``alphadpo_kernels._C_cuda``.

The forward is torch_chunked's: float32 logit blocks by cuBLAS, the online log-sum-exp in the CUDA epilogue. The
backward is the same chunked driver as every backend (chunked_backward.py) with the cuBLAS + epilogue ``dz``
producer: per chunk, float32 logits by one GEMM into a scratch buffer, then one CUDA pass writes ``dz`` in the
input dtype, the operand of the two gradient GEMMs.

Needs no Triton at run time: for restricted containers, older cards, and as an independent implementation to
hold the Triton kernels against. Same exactness bars, the same memory modes and the same no ``rows × T × V`` rule.
"""

from __future__ import annotations

from ... import _extension
from . import torch_chunked
from .options import LogpsOptions


def check_available(hidden2d) -> None:
    if not hidden2d.is_cuda:
        raise ValueError(f"backend='cublas' needs CUDA tensors, got device {hidden2d.device}; use backend='torch'")
    if _extension.cuda_module() is None:
        raise ValueError("backend='cublas' needs the CUDA extension alphadpo_kernels._C_cuda, which is not built; "
                         "reinstall where nvcc is available (ALPHADPO_BUILD_CUDA=1)")


def forward(hidden2d, weight, bias, targets, opts: LogpsOptions):
    check_available(hidden2d)
    return torch_chunked.forward(hidden2d, weight, bias, targets, opts, epilogue=torch_chunked.ExtensionEpilogue)


def backward(hidden2d, weight, bias, targets, lse, g, opts: LogpsOptions, need_dh, need_dw, need_db):
    check_available(hidden2d)
    return torch_chunked.backward(hidden2d, weight, bias, targets, lse, g, opts, need_dh, need_dw, need_db,
                                  epilogue=torch_chunked.ExtensionEpilogue, dz_dtype=hidden2d.dtype)
