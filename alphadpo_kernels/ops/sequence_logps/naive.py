"""Readable full-logits reference for per-sequence log-probs.

This is the math the fused kernels implement, written the way the released α-DPO trainer computes it
(``model(...).logits`` -> ``log_softmax`` -> ``gather`` -> masked mean). It materialises the whole
``rows × T × V`` logits tensor, so it is only for tests, small shapes and the benchmark's ``naive`` row.

For row ``r`` with live tokens ``L_r = {t : labels[r, t] != ignore_index}``::

    z_t      = s · (h_t · Wᵀ + b)                (s = logit_scale; optionally z_t <- c · tanh(z_t / c))
    logp(r)  = Σ_{t ∈ L_r} log_softmax(z_t)[labels[r, t]]   /  |L_r|   (if average)
"""

from __future__ import annotations

import torch

__all__ = ["reference_sequence_logps", "shift_labels"]


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels aligned so that position ``t`` is scored against ``labels[:, t + 1]``.

    The last position has no next token and gets ``ignore_index``. Only the (small) integer tensor is
    copied; hidden states are never shifted.
    """
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def reference_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    average: bool = True,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    shift: bool = False,
    compute_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Per-row log-probs from full logits (differentiable through autograd).

    Args:
        hidden: ``[rows, T, H]`` last hidden states.
        weight: ``[V, H]`` LM-head weight.
        labels: ``[rows, T]`` target ids, ``ignore_index`` where masked.
        bias: optional ``[V]``.
        compute_dtype: dtype of the logits. ``torch.float64`` gives the ground truth; ``None`` computes the
            logits in the inputs' dtype and the softmax in float32, as a bf16 model and the released
            trainer do.

    Returns:
        ``[rows]`` log-probs in ``compute_dtype`` (float32 when ``compute_dtype`` is None).
    """
    if shift:
        labels = shift_labels(labels, ignore_index)
    if compute_dtype is not None:
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if compute_dtype is None:
        logits = logits.float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    live = labels != ignore_index
    safe_labels = torch.where(live, labels, torch.zeros_like(labels))
    token_logps = torch.gather(logits.log_softmax(-1), 2, safe_labels.unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(live, token_logps, torch.zeros_like(token_logps))
    total = token_logps.sum(-1)
    return total / live.sum(-1) if average else total
