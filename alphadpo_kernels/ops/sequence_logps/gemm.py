"""The two GEMM shapes of the chunked backward, always with float32 accumulation inside the GEMM.

* :func:`mm_into` ``out = a @ b``: one GEMM written once in ``out``'s dtype (the ``dW`` chunk in the weight's
  dtype, a ``dH`` row chunk): cuBLAS accumulates in float32 and rounds once.
* :func:`addmm_f32` ``acc (+)= a @ b`` with a float32 ``acc`` and half-precision (or float32) operands: on CUDA
  ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` (torch ≥ 2.8), so partial sums across chunks are
  never rounded to bf16 (that rounding biases training: TRL's kernel notes entropy drifting within dozens of
  steps).

Where a kernel for a dtype combination is missing (the CPU has no ``out_dtype`` GEMMs; the torch backend
keeps ``dz`` in float32 beside bf16 operands; an older torch), the same product is formed from upcast blocks
of at most :data:`UPCAST_BLOCK_BYTES`: bf16 / fp16 products are exact in float32, so the result is the same up
to the order of the float32 sums.

:func:`exact_matmul` scopes cuBLAS settings that would make these GEMMs inexact: TF32 for float32 inputs and
reduced-precision split-K reductions for bf16 / fp16.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .instrument import record_gemm

UPCAST_BLOCK_BYTES = 4 * 2**20


# How a torch or card without an ``out_dtype`` kernel says so: the probe's answer is then "no". Any other error
# (out of memory, an illegal access, a launch failure) says nothing about the kernel: it propagates, and since
# ``functools.cache`` caches only returns, the next call probes again.
_UNSUPPORTED = ("not implemented", "notimplemented", "not supported", "not_supported", "unsupported",
                "only supported", "could not run", "no kernel image", "out_dtype", "same dtype",
                "expected self and mat2", "expected mat1 and mat2", "must have the same dtype")


def _says_unsupported(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return False
    if isinstance(err, NotImplementedError):
        return True
    msg = str(err).lower()
    if isinstance(err, TypeError):  # an older torch: "mm() got an unexpected keyword argument 'out_dtype'"
        return "out_dtype" in msg
    return "out of memory" not in msg and "alloc_failed" not in msg and any(s in msg for s in _UNSUPPORTED)


def _probe(kind: str, dtype: torch.dtype, device_index: int) -> bool:
    with torch.cuda.device(device_index), exact_matmul(torch.device("cuda", device_index)):
        a = torch.ones(2, 2, device="cuda", dtype=dtype)
        acc = torch.ones(2, 2, device="cuda", dtype=torch.float32)
        if kind == "mm":
            torch.mm(a, a, out_dtype=torch.float32, out=acc)
            return bool((acc == 2.0).all())
        # torch 2.8 insisted on a `self` in the operands' dtype; later versions take the float32 accumulator
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3.0).all())


@functools.cache
def _cuda_has(kind: str, dtype: torch.dtype = torch.bfloat16, device_index: int = 0) -> bool:
    """Whether this torch and card have the CUDA ``out_dtype`` kernel ``kind`` for ``dtype`` operands, probed
    once on tiny tensors (an accumulator starting at 1 checks that ``addmm`` really accumulates). Only a
    "not supported"-type error means no (see :data:`_UNSUPPORTED`); anything else, out of memory first, is
    raised and not cached, so a transient failure never leaves the process on the slow path for good."""
    try:
        return _probe(kind, dtype, device_index)
    except (RuntimeError, TypeError, NotImplementedError) as err:
        if _says_unsupported(err):
            return False
        raise


def _native_f32_out(a: torch.Tensor, b: torch.Tensor, kind: str) -> bool:
    return (a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)
            and _cuda_has(kind, a.dtype, a.device.index or 0))


def _upcast_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` from float32 copies of row blocks of ``a`` and column blocks of ``b``."""
    m, k = a.shape
    n = b.shape[1]
    rows = max(1, min(m, UPCAST_BLOCK_BYTES // (4 * max(k, 1))))
    cols = max(1, min(n, UPCAST_BLOCK_BYTES // (4 * max(k, 1))))
    for c0 in range(0, n, cols):
        b_blk = b[:, c0:c0 + cols].float()
        for r0 in range(0, m, rows):
            a_blk = a[r0:r0 + rows].float()
            dst = out[r0:r0 + rows, c0:c0 + cols]
            if accumulate:  # only float32 accumulators are ever accumulated into
                dst.addmm_(a_blk, b_blk)
            elif dst.dtype == torch.float32:
                torch.mm(a_blk, b_blk, out=dst)
            else:
                dst.copy_(a_blk @ b_blk)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` with float32 accumulation, rounded once into ``out``'s dtype."""
    record_gemm("mm", a.shape[0], b.shape[1], a.shape[1])
    if a.dtype == b.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if out.dtype == torch.float32 and _native_f32_out(a, b, "mm"):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    _upcast_into(out, a, b, accumulate=False)
    return out


def addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` for a float32 ``acc``, products and sums in float32."""
    record_gemm("addmm", a.shape[0], b.shape[1], a.shape[1])
    if a.dtype == b.dtype == torch.float32:
        return acc.addmm_(a, b)
    if _native_f32_out(a, b, "addmm"):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if _native_f32_out(a, b, "mm"):  # torch 2.8: float32 product per row block, then an add
        rows = max(1, min(a.shape[0], UPCAST_BLOCK_BYTES // (4 * max(b.shape[1], 1))))
        for r0 in range(0, a.shape[0], rows):
            acc[r0:r0 + rows] += torch.mm(a[r0:r0 + rows], b, out_dtype=torch.float32)
        return acc
    _upcast_into(acc, a, b, accumulate=True)
    return acc


class _Flag:
    """One process-wide cuBLAS setting: read, overridden for a block, restored exactly as it was."""

    def __init__(self, get, set_, value):
        self.get, self.set, self.value = get, set_, value

    def __enter__(self):
        self.saved = self.get()
        self.set(self.value)

    def __exit__(self, *exc):
        self.set(self.saved)


def _tf32_flag() -> _Flag:
    m = torch.backends.cuda.matmul
    try:
        m.allow_tf32  # noqa: B018 - raises when the process set TF32 through the newer fp32_precision API
        return _Flag(lambda: m.allow_tf32, lambda v: setattr(m, "allow_tf32", v), False)
    except RuntimeError:
        return _Flag(lambda: m.fp32_precision, lambda v: setattr(m, "fp32_precision", v), "ieee")


def _reduction_flag(name: str) -> _Flag | None:
    """Reduced-precision (split-K) reductions for bf16 / fp16 GEMMs; torch ≥ 2.8 keeps a (allow, allow_splitk)
    pair behind the bool the public attribute shows, so the private getter / setter restore both."""
    get = getattr(torch._C, f"_get_cublas_allow_{name}_reduced_precision_reduction", None)
    set_ = getattr(torch._C, f"_set_cublas_allow_{name}_reduced_precision_reduction", None)
    if get is None or set_ is None:
        return None

    def restore(value):
        set_(*value) if isinstance(value, tuple) else set_(value)

    return _Flag(get, restore, False)


@contextlib.contextmanager
def exact_matmul(device: torch.device):
    """cuBLAS for the enclosed GEMMs without TF32 (float32 inputs), without reduced-precision split-K reductions and
    without fp16 accumulation (bf16 / fp16 inputs): whatever the process chose, float32 accumulation here."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    flags = [_tf32_flag(), _reduction_flag("bf16"), _reduction_flag("fp16")]
    if hasattr(m, "allow_fp16_accumulation"):  # torch ≥ 2.7; forbids float32 output from fp16 GEMMs when on
        flags.append(_Flag(lambda: m.allow_fp16_accumulation, lambda v: setattr(m, "allow_fp16_accumulation", v),
                           False))
    with contextlib.ExitStack() as stack:
        for flag in flags:
            if flag is not None:
                stack.enter_context(flag)
        yield
