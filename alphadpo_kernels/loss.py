"""The user-facing loss: hidden states + LM head + labels in, α-DPO (or SimPO / DPO / IPO) loss out.

Rows are laid out chosen-first: rows ``0..P-1`` are the chosen responses and rows ``P..2P-1`` the
rejected ones, pair ``i`` being rows ``i`` and ``P + i`` (the released trainer's concatenated batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._validation import ValueChecks, check_loss_hparams, check_pair_rows, check_ref_logps, prepared_once
from .losses import (
    alpha_dpo_head,
    canonical_loss_type,
    dpo_head,
    ipo_head,
    needs_reference,
    preference_metrics,
    simpo_head,
)
from .losses.heads import check_nll_weight, chosen_nll
from .ops.sequence_logps import Backend, LogpsOptions, fused_sequence_logps, prepare_sequence_inputs

__all__ = ["AlphaDPOOutput", "FusedAlphaDPOLoss", "fused_alpha_dpo_loss"]


@dataclass
class AlphaDPOOutput:
    """Result of one loss call. Tensors are ``[P]`` unless noted; everything but ``loss`` is detached."""

    loss: torch.Tensor  # 0-d, differentiable
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    margin_mean: torch.Tensor | None  # [1], α-DPO's running c1 after this call
    margin_std: torch.Tensor | None  # [1], α-DPO's running c2 after this call
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_head_inputs(hidden, weight, labels, bias, cu_seqlens, *, prefix, seq_kwargs, check_values,
                       checks: ValueChecks | None) -> int:
    """Validate one head's inputs, padded or packed, its value checks added to ``checks``; returns the number of
    sequences. Inside the loss call's ``prepared_once`` scope the op called on the same tensors reuses this."""
    return prepare_sequence_inputs(
        hidden, weight, labels, bias, ignore_index=seq_kwargs["ignore_index"], softcap=seq_kwargs["softcap"],
        logit_scale=seq_kwargs["logit_scale"], shift=seq_kwargs["shift"], cu_seqlens=cu_seqlens,
        check_values=check_values, prefix=prefix, checks=checks, **_parallel_kwargs(seq_kwargs))[3]


def _parallel_kwargs(seq_kwargs) -> dict:
    """The context- / vocabulary-parallel groups of the call (only those given)."""
    return {k: seq_kwargs[k] for k in ("cp_group", "tp_group") if seq_kwargs.get(k) is not None}


def _detached(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def _reference_inputs(labels, *, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias,
                      pairs, device, loss_type, seq_kwargs, check_values, checks, against="hidden"):
    """Validate the reference: returns ``("given", ref_c, ref_r)``, ``("none", None, None)`` or
    ``("head", ref_hidden, ref_weight, ref_bias)`` (detached, validated) for :func:`_reference_logps` to run once
    every value check has passed."""
    given = (ref_chosen_logps is not None, ref_rejected_logps is not None)
    if given[0] != given[1]:
        missing = "ref_rejected_logps" if given[0] else "ref_chosen_logps"
        raise ValueError(f"{missing} is missing: pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if given[0] and ref_hidden is not None:
        raise ValueError("pass either ref_chosen_logps/ref_rejected_logps or ref_hidden/ref_weight, not both")
    if given[0]:
        return ("given",
                check_ref_logps(ref_chosen_logps, "ref_chosen_logps", pairs, device, check_values, against, checks),
                check_ref_logps(ref_rejected_logps, "ref_rejected_logps", pairs, device, check_values, against,
                                checks))
    if ref_hidden is None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight/ref_bias given without ref_hidden")
        if needs_reference(loss_type):
            raise ValueError(f"loss_type={loss_type!r} needs reference log-probs: pass ref_chosen_logps and "
                             "ref_rejected_logps, or ref_hidden and ref_weight")
        return "none", None, None
    if ref_weight is None:
        raise ValueError("ref_hidden given without ref_weight; pass ref_weight=weight if the reference model "
                         "shares the policy's LM head")
    # the tensors the op will get, validated as such (so it reuses this validation), named as the caller passed them
    ref_hidden, ref_weight, ref_bias = _detached(ref_hidden), _detached(ref_weight), _detached(ref_bias)
    # the reference head's own vocabulary bounds the labels too (a smaller ref_weight would read garbage rows)
    _check_head_inputs(ref_hidden, ref_weight, labels, ref_bias, seq_kwargs.get("cu_seqlens"), prefix="ref_",
                       seq_kwargs=seq_kwargs, check_values=check_values, checks=checks)
    return "head", ref_hidden, ref_weight, ref_bias


def _reference_logps(ref, labels, pairs, seq_kwargs):
    """The reference log-probs ``(ref_c, ref_r)`` (or ``(None, None)``) of validated :func:`_reference_inputs`."""
    if ref[0] != "head":
        return ref[1], ref[2]
    _, ref_hidden, ref_weight, ref_bias = ref
    with torch.no_grad():
        logps = fused_sequence_logps(ref_hidden, ref_weight, labels, bias=ref_bias, check_values=False, **seq_kwargs)
    return logps[:pairs], logps[pairs:]


def _margin_state(value, name: str, device: torch.device) -> torch.Tensor:
    """``[1]`` float32 tensor from None (step 1: zero), a number, or a 0-d / ``[1]`` tensor (the statistics stay
    float32 whatever dtype they arrive in)."""
    if value is None:
        return torch.zeros(1, dtype=torch.float32, device=device)
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # a fill: no host-to-device copy (a sync)
        return torch.full((1,), float(value), dtype=torch.float32, device=device)
    t = torch.as_tensor(value, dtype=None if isinstance(value, torch.Tensor) else torch.float32, device=device)
    if t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"{name} must be a number or a floating tensor with one element, got {value!r}")
    return t.reshape(1).to(torch.float32)


def fused_alpha_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin_mean: torch.Tensor | None = None,
    margin_std: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    beta: float = 2.5,
    gamma_beta_ratio: float = 0.6,
    alpha: float = 0.2,
    loss_type: str = "alpha_dpo",
    ema_momentum: float = 0.9,
    update_stats: bool = True,
    ignore_index: int = -100,
    softcap: float | None = None,
    average_log_prob: bool = True,
    shift: bool = False,
    label_smoothing: float = 0.0,
    std_eps: float = 1e-8,
    logit_scale: float = 1.0,
    backend: Backend = "auto",
    check_values: bool = True,
    options: LogpsOptions | None = None,
    process_group=None,
    cu_seqlens: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    cp_group=None,
    tp_group=None,
) -> AlphaDPOOutput:
    """Fused preference loss, functional form (the margin state is passed and returned, never mutated).

    Args:
        hidden: ``[2P, T, H]`` policy last hidden states, chosen rows first; or packed ``[N, H]`` / ``[1, N, H]``
            with ``cu_seqlens``.
        weight: ``[V, H]`` policy LM-head weight (``bias``: optional ``[V]``).
        labels: ``[2P, T]`` (packed: ``[N]`` / ``[1, N]``) target ids, ``ignore_index`` on prompt and padding; with
            ``shift=True`` they are the input ids (logit ``t`` scores the next label of its sequence), as in a
            TRL / released-trainer batch.
        cu_seqlens: packed (padding-free) input: int ``[2P + 1]`` boundaries of the 2P sequences in the padded
            rows' order (the P chosen, then the P rejected); ``ref_hidden`` is then packed the same way.
        margin_mean, margin_std: α-DPO running ``c1, c2`` (``[1]`` tensors or numbers; zeros when None,
            i.e. step 1).
        ref_chosen_logps, ref_rejected_logps: ``[P]`` precomputed reference log-probs, or
        ref_hidden, ref_weight, ref_bias: the reference model's ``[2P, T, H]`` hidden states and head, run
            through the forward kernel under ``no_grad``.
        beta, gamma_beta_ratio, alpha, label_smoothing: the released trainer's hyper-parameters.
        loss_type: ``"alpha_dpo"``, ``"simpo"``, ``"sigmoid"`` (DPO) or ``"ipo"``.
        ema_momentum: momentum of the running margin statistics (0.9 in the released trainer).
        update_stats: update ``c1, c2`` from this batch before use (training); False for evaluation.
        average_log_prob: length-normalised log-probs (``ln: true`` in every released config).
        process_group: group over which α-DPO gathers its margin statistics (default: the world, when
            ``torch.distributed`` is initialised). With ``cp_group`` / ``tp_group`` it must be the data-parallel
            group (one rank of each cp × tp block): cp and tp ranks hold the same pairs and would be counted again.
        cp_group, tp_group: context / vocabulary parallelism of the policy head and of a reference head
            (``ref_hidden`` sharded like ``hidden``, ``ref_weight`` like ``weight``); see
            :func:`fused_sequence_logps`. Every cp and tp rank returns the same loss; under cp, multiply it by the
            cp size before ``backward()`` when FSDP averages gradients over cp ranks (docs/parallel.md).
        nll_weight: weight of the NLL (RPO) term on the chosen responses added to the loss: ``−Σ logp / Σ n``
            over every scored chosen token of the call, TRL's ``loss_type=[..., "sft"]`` term (its
            ``loss_weights`` entry) and old TRL's ``rpo_alpha``; logged as ``metrics["nll_loss"]`` (unweighted).
            It comes from the same op call as the pair loss (no second pass over the vocabulary). 0: off.

    Returns:
        :class:`AlphaDPOOutput` with the mean loss over the local pairs, per-pair logps and rewards, the
        updated ``margin_mean`` / ``margin_std`` and the released trainer's metrics.
    """
    loss_type = canonical_loss_type(loss_type)
    check_loss_hparams(beta=beta, gamma_beta_ratio=gamma_beta_ratio, alpha=alpha, ema_momentum=ema_momentum,
                       label_smoothing=label_smoothing, std_eps=std_eps, softcap=softcap, logit_scale=logit_scale)
    nll_weight = check_nll_weight(nll_weight)
    seq_kwargs = dict(ignore_index=ignore_index, average=average_log_prob, softcap=softcap, logit_scale=logit_scale,
                      shift=shift, backend=backend, options=options, cu_seqlens=cu_seqlens)
    if cp_group is not None or tp_group is not None:
        seq_kwargs.update(cp_group=cp_group, tp_group=tp_group)
        _check_margin_group(loss_type, update_stats, process_group)
    # Every input is validated once: metadata first, the value checks of both heads and the reference log-probs
    # then read with one host sync, and the ops called below reuse this validation and the packed layout.
    checks = ValueChecks() if check_values else None
    with prepared_once():
        n_seq = _check_head_inputs(hidden, weight, labels, bias, cu_seqlens, prefix="", seq_kwargs=seq_kwargs,
                                   check_values=check_values, checks=checks)
        pairs = check_pair_rows(n_seq, "hidden" if cu_seqlens is None else "cu_seqlens")
        ref = _reference_inputs(
            labels, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, pairs=pairs, device=hidden.device, loss_type=loss_type,
            seq_kwargs=seq_kwargs, check_values=check_values, checks=checks)
        if checks is not None:
            checks.run()
        ref_c, ref_r = _reference_logps(ref, labels, pairs, seq_kwargs)
        logps = fused_sequence_logps(hidden, weight, labels, bias=bias, check_values=False, **seq_kwargs)
        counts = _chosen_token_counts(hidden, weight, labels, bias, pairs, seq_kwargs) if nll_weight else None
    return _preference_head(
        logps[:pairs], logps[pairs:], ref_c, ref_r, loss_type=loss_type, beta=beta,
        gamma_beta_ratio=gamma_beta_ratio, alpha=alpha, margin_mean=margin_mean, margin_std=margin_std,
        ema_momentum=ema_momentum, update_stats=update_stats, std_eps=std_eps, label_smoothing=label_smoothing,
        process_group=process_group, nll_weight=nll_weight, chosen_token_counts=counts,
        average_log_prob=average_log_prob)


def _chosen_token_counts(hidden, weight, labels, bias, pairs, seq_kwargs) -> torch.Tensor:
    """``[P]`` scored tokens of each chosen sequence, from the labels as the op laid them out (shifted, packed):
    inside the loss call's ``prepared_once`` scope this reuses the op's prepared inputs."""
    _, laid_out, seg, n_seq = prepare_sequence_inputs(
        hidden, weight, labels, bias, ignore_index=seq_kwargs["ignore_index"], softcap=seq_kwargs["softcap"],
        logit_scale=seq_kwargs["logit_scale"], shift=seq_kwargs["shift"], cu_seqlens=seq_kwargs["cu_seqlens"],
        check_values=False, **_parallel_kwargs(seq_kwargs))
    live = laid_out != seq_kwargs["ignore_index"]
    if seg is None:
        counts = live.reshape(n_seq, -1).sum(1)[:pairs]
    else:
        counts = torch.zeros(n_seq, device=live.device).index_add_(0, seg, live.reshape(-1).float())[:pairs]
    if seq_kwargs.get("cp_group") is not None:  # each cp rank counted its own tokens
        counts = counts.float()
        torch.distributed.all_reduce(counts, group=seq_kwargs["cp_group"])
    return counts


def _check_margin_group(loss_type, update_stats, process_group) -> None:
    """Under cp / tp, α-DPO's margin statistics need the data-parallel group: the default (the world) holds every
    pair once per cp × tp rank, which biases the std."""
    import torch.distributed as dist

    if (loss_type == "alpha_dpo" and update_stats and process_group is None and dist.is_available()
            and dist.is_initialized() and dist.get_world_size() > 1):
        raise ValueError("with cp_group / tp_group, pass process_group= the data-parallel group (e.g. "
                         "mesh['dp'].get_group()) for α-DPO's margin statistics: the default, the whole world, holds "
                         "each pair once per context- and tensor-parallel rank and would count it that many times")


def _preference_head(pol_c, pol_r, ref_c, ref_r, *, loss_type, beta, gamma_beta_ratio, alpha, margin_mean,
                     margin_std, ema_momentum, update_stats, std_eps, label_smoothing, process_group,
                     nll_weight=0.0, chosen_token_counts=None, average_log_prob=True) -> AlphaDPOOutput:
    """The loss on per-sequence log-probs ``[P]`` (already validated); with ``nll_weight``, plus that times the
    chosen responses' token-averaged NLL (``chosen_token_counts`` ``[P]``)."""
    if ref_c is not None:
        ref_c, ref_r = ref_c.to(pol_c.dtype), ref_r.to(pol_c.dtype)
    if loss_type == "alpha_dpo":
        head = alpha_dpo_head(
            pol_c, pol_r, ref_c, ref_r, beta=beta, gamma_beta_ratio=gamma_beta_ratio, alpha=alpha,
            margin_mean=_margin_state(margin_mean, "margin_mean", pol_c.device),
            margin_std=_margin_state(margin_std, "margin_std", pol_c.device),
            ema_momentum=ema_momentum, update_stats=update_stats, std_eps=std_eps,
            label_smoothing=label_smoothing, process_group=process_group)
    elif loss_type == "simpo":
        head = simpo_head(pol_c, pol_r, ref_c, ref_r, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
                          label_smoothing=label_smoothing)
    elif loss_type == "sigmoid":
        head = dpo_head(pol_c, pol_r, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing)
    else:
        head = ipo_head(pol_c, pol_r, ref_c, ref_r, beta=beta)

    loss = head.losses.mean()
    metrics = preference_metrics(head.chosen_rewards, head.rejected_rewards, pol_c, pol_r, ref_c, ref_r)
    if nll_weight:
        nll = chosen_nll(pol_c, chosen_token_counts, average_log_prob=average_log_prob)
        loss = loss + nll_weight * nll
        metrics["nll_loss"] = nll.detach()
    return AlphaDPOOutput(
        loss=loss,
        chosen_logps=pol_c.detach(),
        rejected_logps=pol_r.detach(),
        chosen_rewards=head.chosen_rewards,
        rejected_rewards=head.rejected_rewards,
        ref_chosen_logps=ref_c,
        ref_rejected_logps=ref_r,
        margin_mean=head.margin_mean,
        margin_std=head.margin_std,
        metrics=metrics,
    )


class FusedAlphaDPOLoss(nn.Module):
    """α-DPO (and SimPO / DPO / IPO) on hidden states and the LM head, logits never materialised.

    The running margin statistics live in the buffers ``margin_mean`` and ``margin_std`` (``[1]``, float32):
    they are saved in ``state_dict`` (so a resumed run continues exactly) and updated only in training mode
    (``module.eval()`` leaves them alone).

    Example::

        loss_fn = FusedAlphaDPOLoss(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2)
        out = loss_fn(hidden, model.lm_head.weight, labels,
                      ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
        out.loss.backward()
    """

    margin_mean: torch.Tensor
    margin_std: torch.Tensor

    def __init__(
        self,
        beta: float = 2.5,
        gamma_beta_ratio: float = 0.6,
        alpha: float = 0.2,
        loss_type: str = "alpha_dpo",
        ema_momentum: float = 0.9,
        ignore_index: int = -100,
        softcap: float | None = None,
        average_log_prob: bool = True,
        *,
        shift: bool = False,
        label_smoothing: float = 0.0,
        std_eps: float = 1e-8,
        check_values: bool = True,
        options: LogpsOptions | None = None,
        logit_scale: float = 1.0,
        process_group=None,
        nll_weight: float = 0.0,
    ) -> None:
        super().__init__()
        check_loss_hparams(beta=beta, gamma_beta_ratio=gamma_beta_ratio, alpha=alpha, ema_momentum=ema_momentum,
                           label_smoothing=label_smoothing, std_eps=std_eps, softcap=softcap, logit_scale=logit_scale)
        self.nll_weight = check_nll_weight(nll_weight)
        self.logit_scale, self.process_group = logit_scale, process_group
        self.beta, self.gamma_beta_ratio, self.alpha = beta, gamma_beta_ratio, alpha
        self.loss_type = canonical_loss_type(loss_type)
        self.ema_momentum, self.ignore_index, self.softcap = ema_momentum, ignore_index, softcap
        self.average_log_prob, self.shift, self.label_smoothing = average_log_prob, shift, label_smoothing
        self.std_eps, self.check_values, self.options = std_eps, check_values, options
        self.register_buffer("margin_mean", torch.zeros(1))
        self.register_buffer("margin_std", torch.zeros(1))

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        backend: Backend = "auto",
        cu_seqlens: torch.Tensor | None = None,
        cp_group=None,
        tp_group=None,
    ) -> AlphaDPOOutput:
        """See :func:`fused_alpha_dpo_loss` for shapes (padded, or packed with ``cu_seqlens``); the margin state
        comes from this module's buffers."""
        out = fused_alpha_dpo_loss(
            hidden, weight, labels, margin_mean=self.margin_mean, margin_std=self.margin_std, bias=bias,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, beta=self.beta, gamma_beta_ratio=self.gamma_beta_ratio,
            alpha=self.alpha, loss_type=self.loss_type, ema_momentum=self.ema_momentum,
            update_stats=self.training, ignore_index=self.ignore_index, softcap=self.softcap,
            average_log_prob=self.average_log_prob, shift=self.shift, label_smoothing=self.label_smoothing,
            std_eps=self.std_eps, logit_scale=self.logit_scale, backend=backend, check_values=self.check_values,
            options=self.options, cu_seqlens=cu_seqlens, process_group=self.process_group, cp_group=cp_group,
            tp_group=tp_group, nll_weight=self.nll_weight)
        self._keep_stats(out)
        return out

    def loss_from_logps(
        self,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        *,
        chosen_token_counts: torch.Tensor | None = None,
    ) -> AlphaDPOOutput:
        """The same loss on per-sequence log-probs computed elsewhere (e.g. by :func:`fused_sequence_logps` inside
        a model's forward, as the TRL integration does): ``chosen_logps`` / ``rejected_logps`` ``[P]``, with
        gradients; ``ref_*`` ``[P]`` or None for SimPO. Updates the margin statistics in training mode, like
        :meth:`forward`. With ``nll_weight``, ``chosen_token_counts`` ``[P]`` (the scored tokens of each chosen
        sequence) are required: the NLL term is ``−Σ (logp · n if average_log_prob else logp) / Σ n``."""
        for name, t in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 1:
                raise ValueError(f"{name} must be a floating [P] tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                                 f"{' ' + str(t.dtype) if isinstance(t, torch.Tensor) else ''}")
        pairs = chosen_logps.shape[0]
        if pairs == 0:
            raise ValueError("chosen_logps is empty: the loss needs at least one pair")
        check_ref_logps(rejected_logps, "rejected_logps", pairs, chosen_logps.device, against="chosen_logps")
        checks = ValueChecks()
        _, ref_c, ref_r = _reference_inputs(
            None, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, ref_hidden=None,
            ref_weight=None, ref_bias=None, pairs=pairs, device=chosen_logps.device, loss_type=self.loss_type,
            seq_kwargs={}, check_values=self.check_values, checks=checks, against="chosen_logps")
        checks.run()  # one host sync for both reference log-probs' finiteness (none with check_values=False)
        if self.nll_weight and (not isinstance(chosen_token_counts, torch.Tensor)
                                or tuple(chosen_token_counts.shape) != (pairs,)):
            raise ValueError(f"nll_weight={self.nll_weight} needs chosen_token_counts, a [{pairs}] tensor of the "
                             "chosen sequences' scored token counts; got "
                             f"{getattr(chosen_token_counts, 'shape', chosen_token_counts)!r}")
        out = _preference_head(
            chosen_logps, rejected_logps, ref_c, ref_r, loss_type=self.loss_type, beta=self.beta,
            gamma_beta_ratio=self.gamma_beta_ratio, alpha=self.alpha, margin_mean=self.margin_mean,
            margin_std=self.margin_std, ema_momentum=self.ema_momentum, update_stats=self.training,
            std_eps=self.std_eps, label_smoothing=self.label_smoothing, process_group=self.process_group,
            nll_weight=self.nll_weight,
            chosen_token_counts=chosen_token_counts.to(chosen_logps.device) if self.nll_weight else None,
            average_log_prob=self.average_log_prob)
        self._keep_stats(out)
        return out

    def _keep_stats(self, out: AlphaDPOOutput) -> None:
        if self.training and out.margin_mean is not None:
            with torch.no_grad():
                self.margin_mean.copy_(out.margin_mean)
                self.margin_std.copy_(out.margin_std)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.bfloat16()`` (of this module or a parent) move the margin statistics but keep
        them float32: rounding ``c1, c2`` to half precision would shift every later loss."""
        saved = {name: getattr(self, name) for name in ("margin_mean", "margin_std")}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                setattr(self, name, old.to(device=new.device, dtype=torch.float32))
        return self

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, gamma_beta_ratio={self.gamma_beta_ratio}, "
                f"alpha={self.alpha}, ema_momentum={self.ema_momentum}, softcap={self.softcap}")
