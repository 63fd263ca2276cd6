"""Fused kernels for α-DPO and its relatives (DPO, SimPO, IPO) that never materialise the logits.

Public API:
    fused_sequence_logps     per-row (length-normalised) log-probs from hidden states + LM head
    reference_sequence_logps the same from full logits (fp64-capable; tests and the naive baseline)
    fused_alpha_dpo_loss     the loss, functional form (margin state in, updated state out)
    FusedAlphaDPOLoss        the loss as an nn.Module holding the margin state in buffers
"""

from .loss import AlphaDPOOutput, FusedAlphaDPOLoss, fused_alpha_dpo_loss
from .losses import LOSS_TYPES
from .ops import LogpsOptions, fused_sequence_logps, reference_sequence_logps
from .ops.sequence_logps import resolve_backend

__version__ = "0.1.0"


def backends() -> dict[str, bool]:
    """Which backends of ``fused_sequence_logps`` can run here, and which compiled epilogues were built.

    ``torch`` always; ``triton`` with Triton and a CUDA device; ``triton_interpreter``: Triton's interpreter is on
    (``TRITON_INTERPRET=1``: the Triton backend runs on CPU tensors, for tests, slowly); ``cublas`` with the CUDA
    extension and a CUDA device; ``cpu_epilogue`` / ``cuda_epilogue``: the ``csrc/`` extensions (``pip install``
    skips them without a compiler / nvcc)."""
    import os

    import torch

    from . import _extension
    from .ops.sequence_logps import triton_available

    cuda = torch.cuda.is_available()
    return {
        "torch": True,
        "triton": triton_available() and cuda,
        "triton_interpreter": triton_available() and os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cublas": _extension.cuda_module() is not None and cuda,
        "cpu_epilogue": _extension.cpu_module() is not None,
        "cuda_epilogue": _extension.cuda_module() is not None,
    }


__all__ = [
    "AlphaDPOOutput", "FusedAlphaDPOLoss", "LOSS_TYPES", "LogpsOptions", "backends", "fused_alpha_dpo_loss",
    "fused_sequence_logps", "reference_sequence_logps", "resolve_backend", "__version__",
]
