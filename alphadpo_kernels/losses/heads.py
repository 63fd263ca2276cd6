"""Preference loss heads on per-sequence log-probs: α-DPO, SimPO, DPO (sigmoid) and IPO.

Every head takes ``[P]`` tensors (policy chosen / rejected, reference chosen / rejected) and returns
per-pair losses and the detached rewards that the released trainer logs. With ``β`` = ``beta``:

    α-DPO   z = Δπ − sg(α·(M − c1)/c2 + γ/β),  M = Δπ − Δref      loss = −log σ(β z)
    SimPO   z = Δπ − γ/β                                           loss = −log σ(β z)
    DPO     z = Δπ − Δref                                          loss = −log σ(β z)
    IPO     z = Δπ − Δref                                          loss = (z − 1/(2β))²

(−log σ terms take ``label_smoothing`` ε as ``−(1−ε) log σ(βz) − ε log σ(−βz)``.) For α-DPO the running
``c1, c2`` are updated from the gathered ``M`` before use; the normalised term is taken as 0 while
``c2 ≤ std_eps`` (the SimPO limit), where the released trainer divides 0 by 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .margin_stats import update_margin_stats

LOSS_TYPES = ("alpha_dpo", "simpo", "sigmoid", "ipo")
_ALIASES = {"alpha-dpo": "alpha_dpo", "alphadpo": "alpha_dpo", "dpo": "sigmoid"}


def canonical_loss_type(loss_type: str) -> str:
    name = _ALIASES.get(loss_type, loss_type)
    if name not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (or 'dpo', 'alpha-dpo'), got {loss_type!r}")
    return name


def needs_reference(loss_type: str) -> bool:
    return canonical_loss_type(loss_type) != "simpo"


@dataclass
class PreferenceHeadOutput:
    losses: torch.Tensor  # [P]
    chosen_rewards: torch.Tensor  # [P], detached
    rejected_rewards: torch.Tensor  # [P], detached
    margin_mean: torch.Tensor | None = None  # [1], α-DPO's updated c1
    margin_std: torch.Tensor | None = None  # [1], α-DPO's updated c2


def _sigmoid_loss(z: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing


def alpha_dpo_head(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
    alpha: float,
    margin_mean: torch.Tensor,
    margin_std: torch.Tensor,
    ema_momentum: float = 0.9,
    update_stats: bool = True,
    std_eps: float = 1e-8,
    label_smoothing: float = 0.0,
    process_group=None,
) -> PreferenceHeadOutput:
    """α-DPO with the adaptive margin (docs/design.md §1). ``margin_mean`` / ``margin_std`` are the running ``c1, c2``
    (``[1]``); the returned ones are the updated values (equal to the inputs when ``update_stats=False``)."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    margins = (pi_logratios - ref_logratios).detach()
    if update_stats:
        margin_mean, margin_std = update_margin_stats(
            margin_mean, margin_std, margins, ema_momentum=ema_momentum, process_group=process_group
        )
    c1, c2 = margin_mean.to(margins.dtype), margin_std.to(margins.dtype)
    normalised = torch.where(c2 > std_eps, (margins - c1) / torch.clamp(c2, min=std_eps), torch.zeros_like(margins))
    shift = (alpha * normalised + gamma_beta_ratio).detach()
    losses = _sigmoid_loss(pi_logratios - shift, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - alpha * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = beta * (policy_rejected_logps - alpha * (policy_rejected_logps - ref_rejected_logps)).detach()
    return PreferenceHeadOutput(losses, chosen_rewards, rejected_rewards, margin_mean, margin_std)


def _reference_rewards(beta, pc, pr, rc, rr):
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def simpo_head(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
               beta: float, gamma_beta_ratio: float, label_smoothing: float = 0.0) -> PreferenceHeadOutput:
    """SimPO. Rewards are ``β·logp`` (SimPO's own trainer) without references, and ``β·(logp − ref)`` as the
    released α-DPO trainer logs them when references are given."""
    z = policy_chosen_logps - policy_rejected_logps - gamma_beta_ratio
    losses = _sigmoid_loss(z, beta, label_smoothing)
    if ref_chosen_logps is None:
        return PreferenceHeadOutput(losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach())
    return PreferenceHeadOutput(losses, *_reference_rewards(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))


def dpo_head(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float, label_smoothing: float = 0.0) -> PreferenceHeadOutput:
    """DPO (``loss_type="sigmoid"``)."""
    z = policy_chosen_logps - policy_rejected_logps - ref_chosen_logps + ref_rejected_logps
    losses = _sigmoid_loss(z, beta, label_smoothing)
    return PreferenceHeadOutput(losses, *_reference_rewards(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))


def ipo_head(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float) -> PreferenceHeadOutput:
    """IPO: squared distance of the log-ratio gap from ``1/(2β)``."""
    z = policy_chosen_logps - policy_rejected_logps - ref_chosen_logps + ref_rejected_logps
    losses = (z - 1 / (2 * beta)) ** 2
    return PreferenceHeadOutput(losses, *_reference_rewards(
        beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))


def check_nll_weight(nll_weight) -> float:
    """``nll_weight`` as a float: a finite number ``≥ 0`` (0 switches the NLL term off)."""
    if isinstance(nll_weight, bool) or not isinstance(nll_weight, (int, float)) or not math.isfinite(nll_weight) \
            or nll_weight < 0:
        raise ValueError(f"nll_weight must be a finite number >= 0, got {nll_weight!r}")
    return float(nll_weight)


def chosen_nll(chosen_logps: torch.Tensor, chosen_token_counts: torch.Tensor, *,
               average_log_prob: bool) -> torch.Tensor:
    """The negative log-likelihood of the chosen responses, token-averaged over the batch: ``−Σ logp / Σ n`` over
    every scored chosen token, i.e. ``F.cross_entropy(logits, labels, reduction="mean")`` over the chosen tokens
    only. It is TRL's ``loss_type="sft"`` term (``−per_token_logps[chosen_mask].mean()``, local to the micro-batch
    like the pair loss), old TRL's ``rpo_alpha`` NLL and Liger's ``compute_nll_loss`` (cross-entropy summed over
    the chosen tokens, divided by their number).

    ``chosen_logps`` ``[P]`` are the per-sequence log-probs the fused op returned (means when ``average_log_prob``,
    else sums) and ``chosen_token_counts`` ``[P]`` the number of scored tokens of each: the sum over tokens is
    ``mean · n``, so the term's gradient flows through the same op call as the pair loss (no second pass over the
    vocabulary)."""
    counts = chosen_token_counts.to(chosen_logps.dtype)
    sums = chosen_logps * counts if average_log_prob else chosen_logps
    return -sums.sum() / counts.sum()


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The released trainer's metrics, as detached 0-d tensors on the input device (no host sync), and
    ``nonfinite_pairs``: how many pairs had a non-finite log-prob (a bad batch is visible, not averaged away)."""
    logps = [t.detach() for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
             if t is not None]
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    if ref_chosen_logps is not None:
        metrics["logps/ref_chosen"] = ref_chosen_logps.detach().mean()
        metrics["logps/ref_rejected"] = ref_rejected_logps.detach().mean()
    metrics["nonfinite_pairs"] = (~torch.stack([torch.isfinite(t) for t in logps]).all(0)).sum().float()
    return metrics
