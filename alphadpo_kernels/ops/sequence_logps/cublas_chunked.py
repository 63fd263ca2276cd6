"""``backend="cublas"``: the chunked loops of torch_chunked.py with GEMMs in the input dtype through cuBLAS
(float32 output) and the CUDA epilogues of ``alphadpo_kernels._C_cuda`` doing everything else on each chunk.

Needs no Triton at run time: for restricted containers, older cards, and as an independent implementation to
hold the Triton kernels against. Same exactness bars and the same no ``rows × T × V`` rule (chunks are sized
by ``LogpsOptions.memory_budget_mb``).
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
    return torch_chunked.forward(hidden2d, weight, bias, targets, opts, epilogue=torch_chunked.ExtensionEpilogue,
                                 gemm=torch_chunked.NativeGemm)


def backward(hidden2d, weight, bias, targets, lse, g, opts: LogpsOptions, need_dh, need_dw, need_db):
    check_available(hidden2d)
    return torch_chunked.backward(hidden2d, weight, bias, targets, lse, g, opts, need_dh, need_dw, need_db,
                                  epilogue=torch_chunked.ExtensionEpilogue, gemm=torch_chunked.NativeGemm)
