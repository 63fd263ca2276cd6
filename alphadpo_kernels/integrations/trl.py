"""α-DPO, SimPO, DPO and IPO in TRL's ``DPOTrainer``, on this package's fused kernels.

``pip install alphadpo_kernels[trl]`` (tested with ``trl>=1.15,<2``)::

    from alphadpo_kernels.integrations.trl import AlphaDPOConfig, AlphaDPOTrainer

    args = AlphaDPOConfig(output_dir="out", loss_type="alpha_dpo", beta=2.5, gamma_beta_ratio=0.6, alpha=0.2)
    trainer = AlphaDPOTrainer(model="path/or/hub-id", args=args, train_dataset=dataset)
    trainer.train()

What changes against the stock ``trl.DPOTrainer``:

* The per-sequence log-probs come from :func:`~alphadpo_kernels.fused_sequence_logps`, called on the policy's
  last hidden states *inside the model's own forward* (the model's ``forward`` is extended with an
  ``alphadpo_logps`` argument, like TRL's ``fused_lm_head``), so DDP, FSDP and DeepSpeed ZeRO-3 hooks fire as for
  any forward. The fused op runs inside the LM head module's call, so a sharded head is gathered around it.
* Loss types ``alpha_dpo`` (default), ``simpo``, ``sigmoid`` (DPO) and ``ipo`` with the released α-DPO trainer's
  semantics; ``average_log_prob`` chooses length-normalised or summed log-probs (default: normalised for
  ``alpha_dpo`` / ``simpo`` / ``ipo`` as in the released configs and TRL's IPO, summed for ``sigmoid`` as in TRL).
  ``loss_type="sigmoid"`` with summed log-probs is TRL's DPO loss, step for step.
* α-DPO's running margin statistics live in ``trainer.alphadpo_loss`` (a :class:`FusedAlphaDPOLoss`), are saved
  in every checkpoint (``alphadpo_loss_state.pt``) and restored by ``train(resume_from_checkpoint=...)``.
* Precomputed reference log-probs (``precompute_ref_log_probs=True``) are this package's values (length-normalised
  when ``average_log_prob``) and cached under a key that includes that choice, so they never collide with stock
  TRL's summed values for the same dataset and model.
* Logged: TRL's ``rewards/*``, ``logps/*`` and ``num_tokens``, plus ``margin_mean`` / ``margin_std`` (α-DPO) and
  ``nonfinite_pairs``. TRL's ``entropy``, ``logits/*`` and ``mean_token_accuracy`` need vocabulary-wide statistics
  per token that the fused kernels do not compute, so they are not logged.
* TRL's NLL (RPO) term: ``loss_type=[<pair loss>, "sft"]`` with ``loss_weights=[1.0, w]`` adds ``w`` times the
  chosen responses' token-averaged NLL (TRL's ``"sft"`` loss, logged as ``nll_loss``), taken from the same fused
  op call as the pair loss (``FusedAlphaDPOLoss(nll_weight=w)``): no logits, no second pass. The pair loss's
  weight must be 1.
* ``disable_dropout`` (TRL's default) also zeroes the attention dropout *rates* (Llama's ``attention_dropout`` and
  the like), which TRL's ``disable_dropout_in_model`` misses (it resets ``nn.Dropout`` modules only): with such a
  checkpoint the policy would otherwise train with dropout on, and even a learning-rate-0 run would log margins.
* Not supported (refused by name at construction): several pair loss types at once, ``loss_weights`` other
  than ``[1.0]`` / ``[1.0, w]`` with ``"sft"``, ``ld_alpha``,
  ``f_divergence_type`` other than ``reverse_kl``, ``use_weighting``, ``label_smoothing`` with ``ipo``,
  ``sync_ref_model`` with ``simpo`` (which loads no reference model at all).
* Context parallelism through accelerate's ``ParallelismConfig`` (``cp_size``), tensor parallelism through a model
  loaded with ``tp_plan="auto"`` (not both): under cp the
  labels come from the completion mask and are shifted before the tokens are sharded, each sequence's log-prob is
  summed over the cp group, the loss is scaled by cp for the backward only, and α-DPO's statistics and the logged
  metrics are gathered over the data-parallel ranks only (see docs/parallel.md).
* Examples whose chosen or rejected row would have no scored completion token (empty, or truncated away by
  ``max_length``) are dropped, with a warning, where TRL would score them as 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import types
import warnings
from dataclasses import dataclass, field

import torch
from packaging.version import Version

try:
    import trl
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("alphadpo_kernels.integrations.trl needs TRL: pip install 'alphadpo_kernels[trl]' "
                      "(trl>=1.15,<2)") from exc

from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import ModelOutput
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..loss import FusedAlphaDPOLoss
from ..losses import canonical_loss_type, needs_reference
from ..ops.sequence_logps import LogpsOptions
from ..ops.sequence_logps.parallel import is_dtensor
from ..train.modeling import (
    decoder_of,
    disable_dropout,
    head_logps,
    head_of,
    head_transform_of,
    hidden_of,
    text_config_of,
    verify_head,
)
from ..train.parallel import check_attention
from ..train.parallel import setup as setup_parallel

__all__ = ["AlphaDPOConfig", "AlphaDPOTrainer", "AlphaDPOModelOutput", "add_alphadpo_head"]
logger = get_logger(__name__)

TRL_RANGE = (Version("1.15"), Version("2"))
if not TRL_RANGE[0] <= Version(trl.__version__) < TRL_RANGE[1]:  # pragma: no cover
    raise ImportError(f"alphadpo_kernels.integrations.trl is tested with trl>=1.15,<2; this is trl "
                      f"{trl.__version__}")

LOSS_TYPES = ("alpha_dpo", "simpo", "sigmoid", "ipo")
BACKENDS = ("auto", "triton", "torch", "cublas")
STATE_NAME = "alphadpo_loss_state.pt"
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "alphadpo_labels",
                   "alphadpo_scored", "alphadpo_tokens"}
# what a context-parallel batch may hold: TRL's text collator's keys (vision inputs are not sharded)
_CP_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_DEFAULT_BETA = {"alpha_dpo": 2.5, "simpo": 2.5, "sigmoid": 0.1, "ipo": 0.1}


@dataclass
class AlphaDPOConfig(DPOConfig):
    """:class:`trl.DPOConfig` with this package's loss types and kernel settings.

    Every ``DPOConfig`` field keeps its meaning; the ones below are added or change default.
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["alpha_dpo"],
        metadata={"help": "Loss: 'alpha_dpo' (α-DPO, default), 'simpo', 'sigmoid' (DPO) or 'ipo'. One only, "
                  "optionally with 'sft' (TRL's NLL term on the chosen responses, weighted by loss_weights).",
                  "choices": [*LOSS_TYPES, "alpha-dpo", "dpo", "sft"]},
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "β. Default 2.5 for alpha_dpo and simpo (the released α-DPO configs), 0.1 for sigmoid "
                  "and ipo (TRL's default)."},
    )
    gamma_beta_ratio: float = field(
        default=0.6, metadata={"help": "γ/β, the target reward margin over β (alpha_dpo and simpo)."})
    alpha: float = field(default=0.2, metadata={"help": "α, the weight of the adaptive margin (alpha_dpo)."})
    ema_momentum: float = field(
        default=0.9, metadata={"help": "Momentum of α-DPO's running margin mean and std (0.9 in the released "
                               "trainer)."})
    average_log_prob: bool | None = field(
        default=None,
        metadata={"help": "Length-normalised log-probs. Default: True for alpha_dpo, simpo and ipo (the released "
                  "configs' `ln: true`; TRL's IPO normalises too), False for sigmoid (TRL's summed DPO)."},
    )
    kernel_backend: str = field(
        default="auto", metadata={"help": "Backend of the fused log-prob op.", "choices": list(BACKENDS)})
    kernel_memory: str = field(
        default="fast", metadata={"help": "Backward memory mode of the fused op: 'fast' (fewer GEMMs) or 'lean' "
                                  "(peak ≈ the gradients).", "choices": ["fast", "lean"]})
    kernel_memory_budget_mb: float | None = field(
        default=None, metadata={"help": "Scratch budget of the fused op's backward in MB (default: 64)."})
    verify_lm_head: bool = field(
        default=True, metadata={"help": "At construction, check once that the model's logits are "
                                "softcap(scale · lm_head(h)) as read from its config; refuse the model if not "
                                "(skipped where the weights are not all present: ZeRO-3, meta-device loading)."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} loss types "
                             f"{self.loss_type}")
        weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss_type)
        sft_weight = None
        if "sft" in self.loss_type and len(self.loss_type) == 2:  # TRL's NLL term, weighted by its loss_weights entry
            sft_weight = weights.pop(self.loss_type.index("sft"))
            self.loss_type.remove("sft")
        if len(self.loss_type) != 1:
            given = self.loss_type if sft_weight is None else [*self.loss_type, "sft"]
            raise ValueError(f"loss_type: AlphaDPOConfig takes one loss type among {', '.join(LOSS_TYPES)}, "
                             f"optionally with 'sft'; got {given}")
        if weights[0] != 1.0:
            raise ValueError(f"loss_weights: the weight of {self.loss_type[0]!r} must be 1 (got {weights[0]}); only "
                             "the 'sft' term takes another weight. Use trl.DPOTrainer for other combinations")
        if sft_weight is not None and not (isinstance(sft_weight, (int, float)) and math.isfinite(sft_weight)
                                           and sft_weight >= 0):
            raise ValueError(f"loss_weights: the 'sft' weight must be a finite number >= 0, got {sft_weight!r}")
        self.loss_weights = None if sft_weight is None else [1.0, float(sft_weight)]
        try:
            loss = canonical_loss_type(self.loss_type[0])
        except ValueError:
            loss = None
        if loss not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type[0]!r} (TRL's "
                             "other loss types run in trl.DPOTrainer)")
        self.loss_type = [loss]
        if self.beta is None:
            self.beta = _DEFAULT_BETA[loss]
        if self.average_log_prob is None:
            self.average_log_prob = loss != "sigmoid"
        if self.kernel_backend not in BACKENDS:
            raise ValueError(f"kernel_backend must be one of {', '.join(BACKENDS)}; got {self.kernel_backend!r}")
        if self.kernel_memory not in ("fast", "lean"):
            raise ValueError(f"kernel_memory must be 'fast' or 'lean'; got {self.kernel_memory!r}")
        refused = {
            "ld_alpha": self.ld_alpha is not None,
            "f_divergence_type": self.f_divergence_type != "reverse_kl",
            "use_weighting": bool(self.use_weighting),
            "label_smoothing (with ipo)": loss == "ipo" and self.label_smoothing != 0.0,
        }
        bad = [name for name, is_set in refused.items() if is_set]
        if bad:
            raise ValueError(f"AlphaDPOConfig does not support {', '.join(bad)}: unset it, or use trl.DPOTrainer")
        self.loss_type = [loss] if sft_weight is None else [loss, "sft"]  # the pair loss first, then 'sft'
        super().__post_init__()
        self.loss_type = [loss] if sft_weight is None else [loss, "sft"]

    @property
    def nll_weight(self) -> float:
        """The weight of TRL's ``"sft"`` term (0 without it): ``FusedAlphaDPOLoss``'s ``nll_weight``."""
        return self.loss_weights[1] if len(self.loss_type) == 2 else 0.0


@dataclass
class AlphaDPOModelOutput(ModelOutput):
    """What a model patched by :func:`add_alphadpo_head` returns for ``alphadpo_logps=...``."""

    logps: torch.Tensor | None = None  # [rows] per-sequence log-probs of the completion tokens
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss, when router logits were requested


@dataclass(frozen=True)
class LogpsRequest:
    """The ``alphadpo_logps`` argument: how the patched forward reduces each row."""

    average: bool
    backend: str = "auto"
    options: LogpsOptions | None = None
    # context parallel: labels arrive shifted and sharded with the tokens, each row's log-prob summed over the group
    cp_group: object = None
    # tensor parallel: a head sharded Shard(0) on the vocabulary (transformers' tp_plan) is reduced over this group
    tp_group: object = None


def _scored_on_both_sides(example, max_length, mode) -> bool:
    """Whether the collator's row for each side keeps a completion token at a position ≥ 1 (the first position
    scores nothing: it has no preceding logit). Such a row has no log-prob to normalise; TRL would score it 0."""
    prompt = len(example["prompt_ids"])
    for side in ("chosen_ids", "rejected_ids"):
        mask = [0] * prompt + [1] * len(example[side])
        if max_length is not None:
            mask = mask[:max_length] if mode == "keep_start" else mask[-max_length:]
        if not any(mask[1:]):
            return False
    return True


def _backbone(model):
    base = getattr(model, "base_model", None)
    return base if base is not None and base is not model else decoder_of(model)


def _router_aux_loss(model, text_config, router_logits, attention_mask):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None)
    if num_experts is None:
        num_experts = getattr(model, "num_experts", None)
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)


def add_alphadpo_head(model: torch.nn.Module) -> None:
    """Extend ``model.forward`` with ``alphadpo_logps=LogpsRequest(...)``: with it, the forward runs the backbone,
    then :func:`fused_sequence_logps` on the last hidden states and ``labels`` (shifted inside: labels are the
    input ids with ``-100`` off the completion) within the LM head module's call, and returns
    :class:`AlphaDPOModelOutput` with ``logps`` ``[rows]``; the logits are never built. Without it, the forward is
    the previous one (TRL's fused head, or the model's own). Under context parallelism (``cp_group`` in the request)
    ``labels`` are this rank's share of the labels shifted before sharding, and every rank gets the whole rows'
    log-probs. Idempotent."""
    if getattr(model, "_alphadpo_head", False):
        return
    previous = model.forward
    text_config = text_config_of(model)

    @functools.wraps(type(model).forward)
    def forward(self, *args, alphadpo_logps: LogpsRequest | None = None, **kwargs):
        if alphadpo_logps is None:
            return previous(*args, **kwargs)
        labels = kwargs.pop("labels", None)
        if labels is None:
            raise ValueError("alphadpo_logps needs labels: the input ids with -100 off the completion tokens")
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_out = _backbone(self)(*args, **kwargs)
        device = head_of(self).weight.device
        # a model split over devices (device_map) may end its backbone on another device than the head
        req = alphadpo_logps
        # a reference model loaded without the tp_plan keeps a whole head: it needs no vocabulary reduction
        tp_group = req.tp_group if req.tp_group is not None and is_dtensor(head_of(self).weight) else None
        logps = head_logps(self, hidden_of(backbone_out).to(device), labels.to(device), ignore_index=-100,
                           average=req.average, shift=req.cp_group is None, backend=req.backend,
                           options=req.options, cp_group=req.cp_group, tp_group=tp_group)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, text_config, backbone_out.router_logits, kwargs.get("attention_mask"))
        return AlphaDPOModelOutput(logps=logps, aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)
    model._alphadpo_head = True


def _verifiable(model) -> bool:
    """The one-time head check needs the weights: not under ZeRO-3 partitioning (empty parameters) nor on the meta
    device (FSDP's low-memory loading on ranks other than 0)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return False
    except ImportError:  # pragma: no cover
        pass
    # a tensor-parallel model holds DTensor shards: its logits are the tp_plan's, not h·Wᵀ of a local shard
    return not any(p.is_meta or p.numel() == 0 or is_dtensor(p) for p in model.parameters())


@contextlib.contextmanager
def _patch_alongside_trl(trainer: "AlphaDPOTrainer"):
    """While ``DPOTrainer.__init__`` runs: add our forward argument right where TRL adds its fused head, before
    accelerate / DeepSpeed / FSDP wrap the models (accelerate's mixed-precision wrapper, for one, wraps the
    ``forward`` it finds, so ours must already be there to run under the same autocast as TRL's), and check the
    head there, before any reference pass; for a loss without a reference (SimPO), do not let TRL load one."""
    import trl.trainer.dpo_trainer as dpo_module

    add_fused, create = (getattr(dpo_module, name, None) for name in ("add_fused_lm_head", "create_model_from_path"))
    if add_fused is None or create is None:  # pragma: no cover - a TRL that moved them; the version pin prevents it
        raise ImportError(f"trl {trl.__version__}: trl.trainer.dpo_trainer.add_fused_lm_head / create_model_from_path "
                          "not found; alphadpo_kernels.integrations.trl supports trl>=1.15,<2")

    def add_both(model, *args, **kwargs):
        add_fused(model, *args, **kwargs)
        add_alphadpo_head(model)
        if trainer.args.disable_dropout:  # TRL reset the nn.Dropout modules; the attention rates are floats
            disable_dropout(model)  # the float rates too: TRL resets nn.Dropout modules only
        if trainer.args.verify_lm_head and _verifiable(model):
            verify_head(model)

    def create_unless_unused_reference(*args, **kwargs):
        # the policy is created before Trainer.__init__ sets trainer.model; a later call builds the reference
        if not trainer._needs_reference and trainer.__dict__.get("model") is not None:
            return None
        return create(*args, **kwargs)

    dpo_module.add_fused_lm_head, dpo_module.create_model_from_path = add_both, create_unless_unused_reference
    try:
        yield
    finally:
        dpo_module.add_fused_lm_head, dpo_module.create_model_from_path = add_fused, create


class AlphaDPOTrainer(DPOTrainer):
    """:class:`trl.DPOTrainer` whose loss is this package's fused α-DPO / SimPO / DPO / IPO (see the module
    docstring for what differs). Takes every ``DPOTrainer`` argument; ``args`` must be an :class:`AlphaDPOConfig`.
    The loss (and α-DPO's margin statistics) is ``trainer.alphadpo_loss``."""

    _tag_names = ["trl", "dpo", "alpha-dpo", "alphadpo_kernels"]
    _name = "AlphaDPO"
    _paper = {
        "title": "AlphaDPO: Adaptive Reward Margin for Direct Preference Optimization",
        "id": "2410.10148",
        "citation": "@inproceedings{wu2025alpha,\n    title        = {{AlphaDPO: Adaptive Reward Margin for Direct "
                    "Preference Optimization}},\n    author       = {Junkang Wu and Xue Wang and Zhengyi Yang and "
                    "Jiancan Wu and Jinyang Gao and Bolin Ding and Xiang Wang and Xiangnan He},\n    year         = "
                    "2025,\n    booktitle    = {Forty-second International Conference on Machine Learning},\n}",
    }

    def __init__(self, model, ref_model=None, args: AlphaDPOConfig | None = None, *pos, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = AlphaDPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-AlphaDPO")
        if not isinstance(args, AlphaDPOConfig):
            raise TypeError(f"args must be an AlphaDPOConfig (it holds the α-DPO hyper-parameters), got "
                            f"{type(args).__name__}")
        self._par = None  # context / tensor parallelism (set with the accelerator: _setup_parallel)
        loss = args.loss_type[0]
        # built before DPOTrainer.__init__, which precomputes reference log-probs through compute_ref_log_probs
        self.alphadpo_loss = FusedAlphaDPOLoss(
            beta=args.beta, gamma_beta_ratio=args.gamma_beta_ratio, alpha=args.alpha, loss_type=loss,
            ema_momentum=args.ema_momentum, average_log_prob=args.average_log_prob, shift=True,
            label_smoothing=args.label_smoothing, nll_weight=args.nll_weight)
        options = None
        if args.kernel_memory != "fast" or args.kernel_memory_budget_mb is not None:
            options = LogpsOptions(memory=args.kernel_memory, memory_budget_mb=args.kernel_memory_budget_mb)
        self._logps_request = LogpsRequest(average=args.average_log_prob, backend=args.kernel_backend,
                                           options=options)
        self._needs_reference = needs_reference(loss)
        if not self._needs_reference and args.sync_ref_model:
            raise ValueError(f"sync_ref_model: loss_type={loss!r} uses no reference model")
        with _patch_alongside_trl(self):
            super().__init__(model, ref_model, args, *pos, **kwargs)
        self.alphadpo_loss.to(self.accelerator.device)

    # -- context / tensor parallelism ---------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self._setup_parallel()

    def _setup_parallel(self) -> None:
        """Under accelerate's ``ParallelismConfig`` with ``cp_size`` or ``tp_size`` > 1 (or a model loaded with a
        ``tp_plan``): the groups the fused op and the loss use, α-DPO's statistics over the data-parallel ranks
        only, and what is not supported refused by name. Collective (runs on every rank inside ``__init__``)."""
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is None:
            return
        if pc.sp_enabled:
            raise ValueError(f"AlphaDPOTrainer does not take sequence parallelism (parallelism_config sp_size="
                             f"{pc.sp_size}): use cp_size (context parallelism over torch's ring attention)")
        if not (pc.cp_enabled or pc.tp_enabled):
            return
        if pc.cp_enabled and pc.tp_enabled:
            # transformers shards a tp_plan model over every process at load time and sets tp_size from it
            raise ValueError(f"AlphaDPOTrainer takes context or tensor parallelism, not both (parallelism_config "
                             f"cp_size={pc.cp_size}, tp_size={pc.tp_size}); alphadpo-train composes them on GPUs")
        if pc.cp_enabled and pc.cp_backend != "torch":
            raise ValueError(f"parallelism_config cp_backend={pc.cp_backend!r}: AlphaDPOTrainer shards sequences "
                             "with torch's context_parallel (cp_backend='torch')")
        dispatch = getattr(self.args.accelerator_config, "dispatch_batches", None)
        refused = {"PEFT adapters": is_peft_model(self.model),
                   "dispatch_batches (it splits batches over every process, cp ranks included)":
                       pc.cp_enabled and bool(dispatch),
                   "padding_free": bool(self.args.padding_free) and pc.cp_enabled,
                   "the MoE router loss (router_aux_loss_coef with output_router_logits)":
                       pc.cp_enabled and bool(getattr(text_config_of(self.model), "output_router_logits", False))}
        bad = [name for name, is_set in refused.items() if is_set]
        if bad:
            raise ValueError(f"AlphaDPOTrainer does not take {', '.join(bad)} together with context / tensor "
                             f"parallelism (parallelism_config cp_size={pc.cp_size}, tp_size={pc.tp_size})")
        if pc.cp_enabled:
            check_attention(self.model, pc.cp_size, what=f"parallelism_config cp_size={pc.cp_size}")
        self._par = setup_parallel(self.accelerator, pc)
        self._logps_request = dataclasses.replace(self._logps_request, cp_group=self._par.cp_group,
                                                  tp_group=self._par.tp_mesh)
        # the ranks of one cp / tp group hold the same pairs: the margin statistics must not count them twice, and
        # whatever gathers for metrics (transformers' evaluation loop, TRL's reference precompute, the logs) gathers
        # over the data-parallel ranks only, where gathering every process would repeat each pair cp · tp times and
        # cut the wrong rows off an uneven last batch
        self.alphadpo_loss.process_group = self._par.dp_group
        self.accelerator.gather_for_metrics = functools.partial(self._par.gather_for_metrics, self.accelerator)
        self.gather_function = functools.partial(self.accelerator.gather_for_metrics,
                                                 use_gather_object=self.args.eval_use_gather_object)

    def _prepare_context_parallel_inputs(self, model, inputs):
        """transformers' hook around every training step (and, here, every evaluation and reference batch): under
        cp, the labels are built from TRL's ``completion_mask`` and shifted *before* sharding, the scored-token
        counts taken from the whole rows, and ``input_ids``, labels, ``position_ids`` and an all-ones attention
        mask become this rank's head-tail share inside the returned context (torch's ``context_parallel``)."""
        par = self._par
        if par is None or par.cp == 1 or "alphadpo_labels" in inputs:
            return contextlib.nullcontext, inputs
        extra = sorted(set(inputs) - _CP_KEYS)
        if extra:
            raise ValueError(f"context parallelism shards text batches only; this batch also holds {extra}")
        labels = self._labels(inputs)  # every row checked for a scored token on the whole sequence
        shard, enter = par.cp_shard(inputs["input_ids"], labels)
        out = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        out.update(input_ids=shard["input_ids"], attention_mask=shard["attention_mask"],
                   position_ids=shard["position_ids"], alphadpo_labels=shard["labels"],
                   alphadpo_scored=self._scored(inputs), alphadpo_tokens=inputs["attention_mask"].sum())
        return enter, out

    def training_step(self, *args, **kwargs):
        # the loss was multiplied by cp for backward() (see _compute_loss); what is logged is the plain loss
        loss = super().training_step(*args, **kwargs)
        return loss / self._par.loss_scale if self._par is not None else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        if not prediction_loss_only and self._par is not None and self._par.cp > 1:
            raise ValueError("compute_metrics / prediction_loss_only=False under context parallelism: the logits "
                             "and labels would be each rank's share of the tokens; evaluate the loss and the logged "
                             "metrics only")
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self._par.gather(t) if self._par is not None else self.accelerator.gather(t)

    # -- data ---------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if isinstance(dataset, Dataset) and {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
            before = len(dataset)
            dataset = dataset.filter(functools.partial(_scored_on_both_sides, max_length=args.max_length,
                                                       mode=args.truncation_mode),
                                     desc=f"Dropping {dataset_name} examples with no scored completion token")
            if len(dataset) < before:
                logger.warning("%s: dropped %d of %d examples whose chosen or rejected completion has no token left "
                               "to score (empty, or truncated away by max_length=%s)", dataset_name,
                               before - len(dataset), before, args.max_length)
        return dataset

    # -- model glue ---------------------------------------------------------------------------------------------
    def _patch_target(self, model):
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    def _labels(self, inputs) -> torch.Tensor:
        if "alphadpo_labels" in inputs:  # context parallel: shifted before sharding, this rank's share
            return inputs["alphadpo_labels"]
        completion = inputs["completion_mask"]
        live = completion[:, 1:].sum(1)  # a label is scored from the position before it
        if bool((live == 0).any()):
            rows = (live == 0).nonzero().flatten().tolist()
            pairs = completion.shape[0] // 2
            which = [f"{'chosen' if r < pairs else 'rejected'} of pair {r % pairs}" for r in rows[:4]]
            raise ValueError(f"{', '.join(which)}{' ...' if len(rows) > 4 else ''}: no completion token is left "
                             f"(max_length={self.args.max_length} truncates it away, or it is empty); raise "
                             "max_length or drop such examples")
        return inputs["input_ids"].masked_fill(completion == 0, -100)

    @staticmethod
    def _scored(inputs) -> torch.Tensor:
        """``[2P]`` scored completion tokens per row (a label is scored from the position before it)."""
        if "alphadpo_scored" in inputs:  # context parallel: counted on the whole rows before sharding
            return inputs["alphadpo_scored"]
        return inputs["completion_mask"][:, 1:].sum(1)

    @staticmethod
    def _model_kwargs(inputs) -> dict:
        return {**{k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}, "use_cache": False}

    def _reference_adapter(self):
        """With PEFT and no reference model, the reference is the base model (or a "ref" adapter)."""
        if self.ref_model is not None or not is_peft_model(self.model):
            return contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def _model_logps(self, model, model_kwargs, labels) -> AlphaDPOModelOutput:
        if not getattr(self._patch_target(model), "_alphadpo_head", False):
            raise RuntimeError(f"{type(model).__name__} was replaced after AlphaDPOTrainer was built: its forward "
                               "has no alphadpo_logps argument (call add_alphadpo_head on it before wrapping it)")
        return model(**model_kwargs, labels=labels, alphadpo_logps=self._logps_request)

    # -- reference log-probs ------------------------------------------------------------------------------------
    def _precompute_ref_logps(self, dataset, name, batch_size):
        if not self._needs_reference:
            return dataset  # SimPO uses no reference
        model = self.ref_model if self.ref_model is not None else self.model
        base = self._precompute_model_hash
        # our values (length-normalised or summed, our kernels) must never be read back as TRL's or vice versa
        self._precompute_model_hash = Hasher.hash((base, "alphadpo_kernels", self.args.average_log_prob,
                                                   head_transform_of(self._patch_target(model))))
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = base

    def compute_ref_log_probs(self, model, inputs):
        """``[P], [P]`` reference log-probs of one padded batch, from this package's fused op."""
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with (cp_context(), torch.no_grad(),
              disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self._reference_adapter(), self.accelerator.autocast()):
            logps = self._model_logps(model, self._model_kwargs(inputs), self._labels(inputs)).logps.float()
        return logps.chunk(2, dim=0)

    def _reference(self, model_kwargs, labels, inputs):
        if not self._needs_reference:
            return None, None
        if self.precompute_ref_logps:
            device = self.accelerator.device
            return (inputs["ref_chosen_logps"].to(device, torch.float32),
                    inputs["ref_rejected_logps"].to(device, torch.float32))
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        model = self.model if self.ref_model is None else self.ref_model  # None: PEFT, the adapter switched off
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self._reference_adapter()):
            out = self._model_logps(model, ref_kwargs, labels)
        return out.logps.float().chunk(2, dim=0)

    # -- loss and metrics ---------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = self._model_kwargs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        labels = self._labels(inputs)
        outputs = self._model_logps(model, model_kwargs, labels)
        chosen_logps, rejected_logps = outputs.logps.float().chunk(2, dim=0)
        ref_chosen, ref_rejected = self._reference(model_kwargs, labels, inputs)

        self.alphadpo_loss.train(mode == "train")  # the margin statistics move in training only
        counts = None
        if self.alphadpo_loss.nll_weight:  # scored chosen tokens
            counts = self._scored(inputs).chunk(2, dim=0)[0]
        out = self.alphadpo_loss.loss_from_logps(chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                                                 chosen_token_counts=counts)
        loss = out.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        self._log_metrics(mode, inputs, out)
        if mode == "train" and self._par is not None and self._par.loss_scale != 1:
            # every cp rank holds the whole loss but only its own tokens' share of the gradients, and the
            # data-parallel reduction (FSDP2 over dp_shard_cp) averages over cp too: ×cp makes it the sum over cp
            # and the mean over data-parallel ranks (training_step logs the plain loss)
            loss = loss * self._par.loss_scale

        if return_outputs:
            warnings.warn("`return_outputs=True` recomputes the logits with an extra forward pass (the fused loss "
                          "never builds them)", stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, inputs, out) -> None:
        metrics, gather = self._metrics[mode], self._gather
        if mode == "train":
            # under cp / tp gather_for_metrics runs over the data-parallel ranks only (_setup_parallel), so no
            # division by TRL's _tp_size; under cp the tokens were counted before sharding
            tokens = inputs.get("alphadpo_tokens", inputs["attention_mask"].sum())
            self._total_train_tokens += self.accelerator.gather_for_metrics(tokens).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen, rejected = gather(out.chosen_rewards), gather(out.rejected_rewards)
        metrics["rewards/chosen"].append(chosen.mean().item())
        metrics["rewards/rejected"].append(rejected.mean().item())
        metrics["rewards/accuracies"].append((chosen > rejected).float().mean().item())
        metrics["rewards/margins"].append((chosen - rejected).mean().item())
        metrics["logps/chosen"].append(gather(out.chosen_logps).mean().item())
        metrics["logps/rejected"].append(gather(out.rejected_logps).mean().item())
        metrics["nonfinite_pairs"].append(gather(out.metrics["nonfinite_pairs"].reshape(1)).sum().item())
        if "nll_loss" in out.metrics:  # TRL's "sft" term, unweighted (old TRL's name for it)
            metrics["nll_loss"].append(gather(out.metrics["nll_loss"].reshape(1)).mean().item())
        if out.margin_mean is not None:  # α-DPO: the same on every rank (gathered before the update)
            metrics["margin_mean"].append(float(out.margin_mean))
            metrics["margin_std"].append(float(out.margin_std))

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in self.alphadpo_loss.state_dict().items()}
            torch.save({"loss_type": self.alphadpo_loss.loss_type, **state}, os.path.join(folder, STATE_NAME))
        super()._save_checkpoint(model, trial)

    def load_alphadpo_state(self, checkpoint: str) -> None:
        """Restore the loss's margin statistics from ``checkpoint`` (a folder a previous run saved)."""
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            if self.alphadpo_loss.loss_type == "alpha_dpo":
                raise ValueError(f"{checkpoint} has no {STATE_NAME}: it was not saved by AlphaDPOTrainer, so α-DPO's "
                                 "running margin statistics cannot be restored and the resumed loss would differ")
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.pop("loss_type") != self.alphadpo_loss.loss_type:
            raise ValueError(f"{checkpoint} was saved with another loss type than {self.alphadpo_loss.loss_type!r}")
        self.alphadpo_loss.load_state_dict(state)

    def train(self, resume_from_checkpoint: str | bool | None = None, *pos, **kwargs):
        """:meth:`transformers.Trainer.train`, restoring α-DPO's margin statistics when resuming."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self.load_alphadpo_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *pos, **kwargs)
