"""Differentiable ops, each in its own folder with a readable plain-torch twin (``naive.py``)."""

from .sequence_logps import LogpsOptions, fused_sequence_logps, reference_sequence_logps

__all__ = ["LogpsOptions", "fused_sequence_logps", "reference_sequence_logps"]
