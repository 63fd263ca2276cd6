"""``backend="triton"`` backward: the chunked GEMM driver with the Triton ``dz`` kernel as its producer.

Per vocabulary chunk the Triton kernel (triton_grad_logits.py) recomputes the logits with tensor cores and writes
``dz`` once in the input dtype; cuBLAS then forms ``dW[vs:ve] = dzᵀ·H`` and ``dH += dz·W[vs:ve]`` with float32
accumulation (chunked_backward.py, ``LogpsOptions.memory`` picks the plan). Opt-in tile skipping
(``filter_eps``) is the one exception: it runs the atomic kernel of triton_skip_backward.py.
"""

from __future__ import annotations

from .chunked_backward import chunked_backward
from .options import LogpsOptions
from .triton_common import check_triton_device
from .triton_grad_logits import TritonGradLogits
from .triton_skip_backward import skip_backward


def backward(hidden2d, weight, bias, targets, lse, g, opts: LogpsOptions, need_dh, need_dw, need_db):
    """Returns ``(dH [N, H] in hidden's dtype, dW [V, H] in weight's dtype, db [V] float32)``, None where
    not needed."""
    check_triton_device(hidden2d)
    if opts.filter_threshold(hidden2d.dtype) is not None:
        return skip_backward(hidden2d, weight, bias, targets, lse, g, opts, need_dh, need_dw, need_db)
    producer = TritonGradLogits(weight, bias, opts, hidden2d.dtype)
    return chunked_backward(hidden2d, weight, bias, targets, lse, g, opts, need_dh, need_dw, need_db, producer)
