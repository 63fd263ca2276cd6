"""Model glue: run the decoder to its last hidden states and hand them, with the LM head's weight, to the
fused loss. The LM head is never applied to whole sequences.

The fused call runs *inside the head module's own call* (its ``forward`` is swapped for the duration), so
whatever gathers a sharded head weight around that module's forward (FSDP's unshard, DeepSpeed ZeRO-3's
parameter fetch) does so around the fused kernels too, and gradients land in the sharded parameter as usual.
Tied embeddings need nothing special: the head's weight is the embedding's parameter.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..loss import AlphaDPOOutput, FusedAlphaDPOLoss
from ..ops.sequence_logps import fused_sequence_logps


def decoder_of(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if getter is not None else None
    if decoder is None:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if decoder is None:
        raise ValueError(f"cannot find the decoder of {type(model).__name__} (no get_decoder() / base model)")
    return decoder


def head_of(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) with a weight")
    return head


def text_config_of(model: nn.Module):
    """The config of the language model (a vision-language model's ``text_config``, else the config itself)."""
    config = model.config
    return getattr(config, "text_config", None) or config


# What transformers' causal-LM heads do to the logits after ``lm_head``, by config attribute, in order:
# a scale (Cohere's logit_scale, Granite's and MiniCPM3's 1 / logits_scaling, the output / lm_head multipliers),
# then a soft-cap. HyperCLOVA X multiplies by its logits_scaling where Granite divides.
_SCALES = (("logit_scale", False), ("logits_scaling", True), ("output_multiplier", False),
           ("lm_head_multiplier", False))
_MULTIPLY_LOGITS_SCALING = ("hyperclovax",)


def head_transform_of(model: nn.Module) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a model's LM head: logits = softcap(scale · lm_head(h))."""
    config = text_config_of(model)
    scale = 1.0
    multiplies = str(getattr(config, "model_type", "")).startswith(_MULTIPLY_LOGITS_SCALING)
    for name, divides in _SCALES:
        divides = divides and not multiplies
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            scale = scale / value if divides else scale * value
    return scale, getattr(config, "final_logit_softcapping", None) or None


@torch.no_grad()
def verify_head(model: nn.Module, *, atol: float | None = None) -> None:
    """Raise if ``model(...).logits`` is not ``softcap(scale · (h·Wᵀ + b))`` of its decoder's last hidden states:
    a family whose head does something else is refused with a clear error rather than trained on other numbers.
    Runs the model once on four tokens."""
    scale, softcap = head_transform_of(model)
    head = head_of(model)
    device = head.weight.device
    ids = torch.arange(1, 5, device=device)[None] % head.weight.shape[0]
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        hidden = last_hidden_states(model, ids, mask).float()
    finally:
        model.train(was_training)
    z = hidden @ head.weight.float().T
    if getattr(head, "bias", None) is not None:
        z = z + head.bias.float()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    tol = atol if atol is not None else (1e-3 if head.weight.dtype == torch.float32 else 5e-2) * (1 + z.abs().max())
    err = float((z - expected).abs().max())
    if not err <= tol:
        raise ValueError(
            f"{type(model).__name__}: its LM head's logits are not softcap(logit_scale · (h·Wᵀ + b)) of the decoder's "
            f"hidden states as read from its config (logit_scale={scale}, softcap={softcap}; max difference "
            f"{err:.3g}), so the fused loss would train on other numbers: this model family is not supported")


def last_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states. Packed (padding-free) input passes ``position_ids`` that restart at 0 for
    each sequence and no attention mask: transformers then attends within each sequence (and ``use_cache`` must
    be off, or it does not look)."""
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    return hidden_of(decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs))


def hidden_of(outputs) -> torch.Tensor:
    """The last hidden states of a decoder's outputs (a ModelOutput, or a tuple from ``return_dict=False``)."""
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_padding_free(model: nn.Module) -> None:
    """Padding-free batches need transformers to find the packed sequences from ``position_ids`` (≥ 4.56, its
    masking utilities) and an attention implementation that honours it."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError as exc:
        import transformers

        raise ValueError(f"padding_free needs transformers >= 4.56 (packed sequences found from position_ids); "
                         f"this is {transformers.__version__}") from exc
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        raise ValueError(f"padding_free needs an attention implementation that attends within packed sequences "
                         f"({', '.join(PACKED_ATTENTION)}); {type(model).__name__} uses {impl!r} "
                         f"(set attn_implementation)")


@contextlib.contextmanager
def _head_forward(head: nn.Module, fn):
    original = head.forward
    head.forward = fn
    try:
        yield
    finally:
        head.forward = original


def call_through_head(model: nn.Module, fn, *args, **kwargs):
    """``fn(weight, bias, *args, **kwargs)`` run as the LM head module's forward (see the module docstring)."""
    head = head_of(model)

    def forward(*a, **kw):
        return fn(head.weight, getattr(head, "bias", None), *a, **kw)

    with _head_forward(head, forward):
        return head(*args, **kwargs)


def head_logps(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """:func:`fused_sequence_logps` of ``labels`` on ``hidden`` through ``model``'s LM head, with the head's scale
    and soft-cap read from its config, run as the head module's call (``kwargs``: the op's other arguments)."""
    scale, softcap = head_transform_of(model)

    def fused(weight, bias, hidden, labels):
        return fused_sequence_logps(hidden, weight, labels, bias=bias, softcap=softcap, logit_scale=scale, **kwargs)

    return call_through_head(model, fused, hidden, labels)


def scored_token_counts(labels: torch.Tensor, cu_seqlens: torch.Tensor | None, ignore_index: int,
                        shift: bool) -> torch.Tensor:
    """``[2P]`` scored tokens of each sequence (a label is scored from the position before it when ``shift``):
    padded ``labels`` ``[2P, T]``, or packed ``[1, N]`` / ``[N]`` with ``cu_seqlens`` ``[2P + 1]``."""
    if cu_seqlens is None:
        return (labels[:, 1:] if shift else labels).ne(ignore_index).sum(1)
    live = labels.reshape(-1).ne(ignore_index).long()
    total = torch.cat([live.new_zeros(1), live.cumsum(0)])
    cu = cu_seqlens.to(device=labels.device, dtype=torch.long)
    return total[cu[1:]] - total[cu[:-1] + int(shift)]


class PreferenceModel(nn.Module):
    """Policy + fused loss as one module, so that DDP / FSDP / DeepSpeed wrap (and checkpoint) both.

    ``forward(batch)`` takes a collated chosen-first batch (``input_ids``, ``attention_mask``, ``labels``
    ``[2P, T]`` and either ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[P]``, or ``ref_model``: a module that
    maps the batch to its ``[2P]`` reference log-probs, reference.ReferenceModel) and returns
    :class:`AlphaDPOOutput`. The loss's margin statistics are buffers of this
    module, so they are saved with the model's state.
    """

    def __init__(self, policy: nn.Module, loss_fn: FusedAlphaDPOLoss, backend: str = "auto"):
        super().__init__()
        self.policy = policy
        self.loss_fn = loss_fn
        self.backend = backend
        # context / tensor parallel (train/parallel.py): under cp the labels arrive shifted and sharded with the
        # tokens, and each sequence's log-prob is summed over the cp group; under tp the head is a vocabulary shard
        self.cp_group = None
        self.tp_group = None
        # what accelerate's FSDP auto-wrap (TRANSFORMER_BASED_WRAP) shards separately: the policy's decoder layers
        self._no_split_modules = getattr(policy, "_no_split_modules", None)
        scale, softcap = head_transform_of(policy)
        if loss_fn.softcap is None:
            loss_fn.softcap = softcap
        if loss_fn.logit_scale == 1.0:
            loss_fn.logit_scale = scale

    def forward(self, batch: dict, ref_model: nn.Module | None = None) -> AlphaDPOOutput:
        ref_c = ref_r = None
        if "ref_chosen_logps" in batch:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif ref_model is not None:
            with torch.no_grad():
                ref = ref_model(batch).float()
            p = ref.shape[0] // 2
            ref_c, ref_r = ref[:p], ref[p:]
        hidden = last_hidden_states(self.policy, batch["input_ids"], batch.get("attention_mask"),
                                    batch.get("position_ids"))
        logps = self.sequence_logps(hidden, batch["labels"], batch.get("cu_seqlens"))
        pairs = logps.shape[0] // 2
        counts = None
        if self.loss_fn.nll_weight:
            counts = scored_token_counts(batch["labels"], batch.get("cu_seqlens"), self.loss_fn.ignore_index,
                                         self.loss_fn.shift and self.cp_group is None)
            if self.cp_group is not None:  # this rank's tokens only: the sequence's count is the sum over cp
                import torch.distributed as dist

                dist.all_reduce(counts, group=self.cp_group)
            counts = counts[:pairs]
        return self.loss_fn.loss_from_logps(logps[:pairs], logps[pairs:], ref_c, ref_r, chosen_token_counts=counts)

    def sequence_logps(self, hidden: torch.Tensor, labels: torch.Tensor,
                       cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``[2P]`` policy log-probs from the fused op, run as the LM head module's call, which returns them as a
        plain tensor: DeepSpeed ZeRO-3 registers its pre-backward hook (the re-gather of a partitioned head weight
        for the backward) only on tensors found in a module's outputs, so the head call must not return the loss's
        output dataclass. The loss on these log-probs is computed outside the head call (``loss_from_logps``)."""
        loss_fn = self.loss_fn

        def fused(weight, bias, hidden, labels):
            return fused_sequence_logps(hidden, weight, labels, bias=bias, ignore_index=loss_fn.ignore_index,
                                        average=loss_fn.average_log_prob, softcap=loss_fn.softcap,
                                        logit_scale=loss_fn.logit_scale, shift=loss_fn.shift and self.cp_group is None,
                                        backend=self.backend, options=loss_fn.options, cu_seqlens=cu_seqlens,
                                        check_values=loss_fn.check_values, cp_group=self.cp_group,
                                        tp_group=self.tp_group)

        return call_through_head(self.policy, fused, hidden, labels)


@torch.no_grad()
def reference_logps(ref_model: nn.Module, batch: dict, loss_fn: FusedAlphaDPOLoss, backend: str = "auto",
                    cp_group=None, tp_group=None) -> torch.Tensor:
    """``[2P]`` reference log-probs from one no-grad decoder pass and the fused forward kernel (under cp, the batch
    is this rank's share with pre-shifted labels, as for the policy)."""
    hidden = last_hidden_states(ref_model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    return head_logps(ref_model, hidden, batch["labels"], ignore_index=loss_fn.ignore_index,
                      average=loss_fn.average_log_prob, shift=loss_fn.shift and cp_group is None,
                      cu_seqlens=batch.get("cu_seqlens"), backend=backend, check_values=False, cp_group=cp_group,
                      tp_group=tp_group).float()


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere, as the released runs effectively train: ``nn.Dropout`` modules, the float rates that
    attention implementations read from their module (``attention_dropout`` & co.) and the config's rates. The
    model stays in train mode (gradient checkpointing needs it)."""
    config = getattr(model, "config", None)
    for obj in [*model.modules(), *([config] if config is not None else [])]:
        if isinstance(obj, nn.Dropout):
            obj.p = 0.0
        for name, value in list(vars(obj).items()):
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
                setattr(obj, name, 0.0)
    return model
