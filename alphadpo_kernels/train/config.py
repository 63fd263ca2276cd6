"""Training configuration: a YAML file and/or command-line flags, defaults from the released α-DPO runs
(Llama-3-8B-Instruct: β = 2.5, γ/β = 0.6, α = 0.2, lr 1e-6, batch 128, max_length 2048 / 1800, gradient
checkpointing, logging every 5 steps, evaluation every 400). The released configs themselves are shipped in
``examples/configs/``.

Every field is a flag (``--learning-rate``) and a YAML key (``learning_rate``), with its help text and, where
the values are a closed set, its choices. Flags are never abbreviated (``--learning-rat`` is an error, not the
default rate), and a user error (bad key, bad value, missing file) raises :class:`ConfigError`, which the
command line reports in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration the user can fix: reported in one line, exit status 2."""


def _f(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model and data
    model_name_or_path: str | None = _f(None, "policy checkpoint: a hub name or a local folder")
    ref_model_name_or_path: str | None = _f(None, "reference checkpoint (default: the policy's starting weights)")
    tokenizer_name_or_path: str | None = _f(None, "tokenizer (default: the model's)")
    chat_template: str | None = _f(None, "a Jinja chat template, or a file holding one (default: the tokenizer's)")
    attn_implementation: str | None = _f(None, "attention implementation, e.g. flash_attention_2 (released Llama / "
                                               "Mistral) or eager (Gemma-2)")
    train_file: str | None = _f(None, "JSONL / JSON / datasets folder with prompt, chosen, rejected, or a hub data "
                                      "set org/name[:split] (split train by default)")
    eval_file: str | None = _f(None, "evaluation data, as train_file (split test by default for a hub data set)")
    eval_fraction: float = _f(0.0, "hold out this share (in [0, 1)) of train_file for evaluation; not together with "
                                   "eval_file, nor with --demo (which evaluates on its own held-out set)")
    output_dir: str = _f("alphadpo-output", "metrics, checkpoints, caches and the final model go here")
    overwrite: bool = _f(False, "start afresh in an output_dir that holds a previous run (its metrics and "
                                "checkpoints are removed); without it such a folder is refused unless resuming")
    # loss (names as in the released trainer)
    loss_type: str = _f("alpha_dpo", "preference loss", ("alpha_dpo", "simpo", "sigmoid", "ipo"))
    beta: float = _f(2.5, "β, the reward scale")
    gamma_beta_ratio: float = _f(0.6, "γ/β, the target reward margin (α-DPO, SimPO)")
    alpha: float = _f(0.2, "α, the weight of the adaptive margin (α-DPO; 0 is SimPO)")
    ema_momentum: float = _f(0.9, "momentum of α-DPO's running margin statistics")
    label_smoothing: float = _f(0.0, "label smoothing of the sigmoid losses")
    nll_weight: float = _f(0.0, "weight of the NLL (RPO) term on the chosen responses, from the same fused pass: "
                                "TRL's 'sft' loss weight, old TRL's rpo_alpha (0: off)")
    average_log_prob: bool = _f(True, "length-normalised log-probs (true in every released config)")
    reference_mode: str = _f("precompute", "reference log-probs computed once over the training batches and cached, "
                                           "or each step", ("precompute", "online"))
    # tokenization (released: keep the end of the prompt, then cut the response)
    max_length: int = _f(2048, "longest prompt + response, in tokens")
    max_prompt_length: int = _f(1800, "longest prompt kept (its end) when a pair is too long")
    # optimisation
    per_device_train_batch_size: int = _f(2, "pairs per device per micro-batch")
    per_device_eval_batch_size: int = _f(4, "pairs per device per evaluation batch")
    gradient_accumulation_steps: int = _f(16, "micro-batches per optimizer step")
    learning_rate: float = _f(1e-6, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW β1")
    adam_beta2: float = _f(0.999, "AdamW β2")
    warmup_ratio: float = _f(0.1, "share of the steps spent warming the learning rate up (cosine schedule after)")
    num_train_epochs: float = _f(1.0, "epochs over the training data")
    max_steps: int = _f(-1, "optimizer steps; overrides num_train_epochs when > 0")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: no clipping)")
    mixed_precision: str = _f("bf16", "compute dtype (accelerate's autocast), not the weights'", ("no", "bf16", "fp16"))
    weights_dtype: str = _f("fp32", "dtype the weights are stored and updated in: fp32 master weights (the released "
                                    "recipe), or bf16 (needs optimizer adamw_kahan)", ("fp32", "bf16"))
    optimizer: str = _f("adamw", "torch's AdamW, or optimi's Kahan-compensated AdamW (for bf16 weights)",
                        ("adamw", "adamw_kahan"))
    gradient_checkpointing: bool = _f(True, "recompute activations in the backward (on in the released runs)")
    backend: str = _f("auto", "fused-loss backend", ("auto", "triton", "torch", "cublas"))
    padding_free: bool = _f(False, "pack each micro-batch's sequences into one row (position_ids restart; no padding)")
    memory: str = _f("fast", "the fused loss's backward: fast (4 GEMM units) or lean (5 units, <= 1.1 x its "
                             "gradients)", ("fast", "lean"))
    # parallelism beyond data parallel (the processes are data × context × tensor parallel)
    context_parallel: int = _f(1, "split every sequence over this many processes (context parallel: ring attention, "
                                  "needs GPUs and attn_implementation sdpa; long sequences past one GPU)")
    tensor_parallel: int = _f(1, "split the model's weights over this many processes by its transformers tp_plan "
                                 "(the LM head on the vocabulary; the fused loss reduces over the shards)")
    # LoRA (PEFT's and TRL's names)
    lora_r: int = _f(0, "LoRA rank (PEFT's r, TRL's lora_r); 0 trains every weight. With LoRA the reference is the "
                        "base model with the adapters switched off (no second copy), and only the adapters are saved "
                        "(needs peft)")
    lora_alpha: float = _f(32.0, "LoRA scaling numerator (PEFT's lora_alpha; the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch, in [0, 1) (every other dropout stays off)")
    lora_target_modules: str | None = _f(None, "modules that get adapters: comma-separated names (q_proj,v_proj) or "
                                               "all-linear (default: PEFT's choice for the architecture); never the "
                                               "LM head, which the fused loss reads whole")
    # bookkeeping
    logging_steps: int = _f(5, "log the means over every this-many optimizer steps (as the released runs)")
    eval_steps: int = _f(400, "evaluate every this-many optimizer steps (as the released runs)")
    save_steps: int = _f(500, "write a full checkpoint (model, optimizer, scheduler, RNG, data position) every "
                              "this-many optimizer steps; the final model is always written to OUTPUT_DIR/final")
    save_final_state: bool = _f(False, "also write a full checkpoint (optimizer, scheduler, RNG) at the end")
    save_total_limit: int = _f(2, "checkpoints kept")
    seed: int = _f(42, "seed of the data order and initialisation, in [0, 2**32)")
    resume: str | None = _f(None, "a checkpoint folder, or 'latest' (the newest checkpoint-* in output_dir)")
    demo: bool = _f(False, "train the embedded demo: a tiny Llama on a synthetic task, CPU, no downloads; it sets its "
                           "own data, sizes, steps and output_dir (alphadpo-demo), which flags still override")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": None, "choices": None})

    def validate(self) -> "TrainConfig":
        """Every value checked before any work (no folder written, no model built): a :class:`ConfigError` naming
        the field otherwise. Checks what can be known here: types, ranges, combinations, files and folders, and
        whether the chosen backend / optimizer can run on this machine."""
        for f in dataclasses.fields(self):
            if f.name != "extra":
                setattr(self, f.name, _typed(f, getattr(self, f.name)))
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        if self.weights_dtype == "bf16" and self.optimizer != "adamw_kahan":
            raise ConfigError(
                "weights_dtype='bf16' needs optimizer='adamw_kahan': a plain AdamW rounds each update into the bf16 "
                "weight, and at preference-training learning rates (~1e-6) an update is far below half a bf16 ulp "
                "of an ordinary weight (~1.2e-4 at |w| = 0.05), so most weights would never move while the run logs "
                "losses as usual. Use --optimizer adamw_kahan (optimi's AdamW, which carries the rounding error "
                "forward in a Kahan compensation buffer) or keep --weights-dtype fp32 (float32 master weights, "
                "bf16 compute via --mixed-precision bf16, as the released runs did)")
        self._check_ranges()
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                              f"({self.max_length})")
        if not self.demo and (self.model_name_or_path is None or self.train_file is None):
            raise ConfigError("model_name_or_path and train_file are required (or pass --demo)")
        if self.eval_fraction > 0 and self.eval_file:
            if self.demo:
                raise ConfigError("eval_fraction does not apply to --demo: the demo evaluates on a held-out set, "
                                  "its own or the --eval-file given")
            raise ConfigError(f"eval_fraction ({self.eval_fraction}) and eval_file ({self.eval_file!r}) both choose "
                              "the evaluation data: give one of them")
        for name in ("train_file", "eval_file"):
            path = getattr(self, name)
            if path and not os.path.exists(path) and not _looks_like_hub_name(path):
                raise ConfigError(f"{name} {path!r} does not exist (and is not a hub data set org/name[:split])")
        if self.resume and self.resume != "latest" and not os.path.isdir(self.resume):
            raise ConfigError(f"resume {self.resume!r}: no such checkpoint folder (or pass 'latest')")
        self._check_loss()
        self._check_parallel()
        self._check_lora()
        self._check_machine()
        return self

    def _check_parallel(self) -> None:
        for name in ("context_parallel", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (1: off), got {getattr(self, name)}")
        if self.context_parallel == 1 and self.tensor_parallel == 1:
            return
        if self.context_parallel > 1 and self.padding_free:
            raise ConfigError("padding_free does not combine with context_parallel: ring attention is causal over the "
                              "whole row, so packed sequences would attend to each other (pad instead)")
        if self.lora_r > 0:
            raise ConfigError("LoRA with context_parallel / tensor_parallel is not supported yet")
        if launched_plugin() == "deepspeed":
            raise ConfigError("context_parallel / tensor_parallel run under FSDP2 (GPUs) or plain processes, not "
                              "under accelerate's DeepSpeed plugin")

    def _check_lora(self) -> None:
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be at least 0 (0: no LoRA), got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.lora_r == 0:
            changed = [n for n in ("lora_alpha", "lora_dropout", "lora_target_modules")
                       if getattr(self, n) != defaults[n]]
            if changed:
                raise ConfigError(f"{', '.join(changed)} set without lora_r: pass --lora-r (a rank > 0) to train "
                                  "LoRA adapters")
            return
        targets = [t.strip() for t in (self.lora_target_modules or "").split(",") if t.strip()]
        if self.lora_target_modules is not None and not targets:
            raise ConfigError("lora_target_modules is empty: give module names (q_proj,v_proj) or all-linear")
        if any(t.rsplit(".", 1)[-1] in ("lm_head", "embed_out", "output") for t in targets):
            raise ConfigError("lora_target_modules must not include the LM head: the fused loss reads the head's "
                              "weight whole (it stays frozen under LoRA)")
        if self.ref_model_name_or_path:
            raise ConfigError("ref_model_name_or_path does not apply with LoRA: the reference is the base model with "
                              "the adapters switched off")
        if launched_plugin() is not None:
            raise ConfigError(f"LoRA under accelerate's {launched_plugin()} plugin is not supported yet: run it on "
                              "one process or plain data parallel")
        if importlib.util.find_spec("peft") is None:
            raise ConfigError("lora_r > 0 needs peft (pip install peft)")

    def _check_ranges(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "eval_steps", "save_steps", "save_total_limit", "max_length",
                     "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        ranges = {  # name: (low, low inclusive, high, high inclusive)
            "learning_rate": (0.0, True, math.inf, False), "weight_decay": (0.0, True, math.inf, False),
            "adam_beta1": (0.0, True, 1.0, False), "adam_beta2": (0.0, True, 1.0, False),
            "warmup_ratio": (0.0, True, 1.0, True), "num_train_epochs": (0.0, False, math.inf, False),
            "max_grad_norm": (0.0, True, math.inf, False), "eval_fraction": (0.0, True, 1.0, False),
        }
        for name, (lo, lo_in, hi, hi_in) in ranges.items():
            v = getattr(self, name)
            if not ((v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)):
                where = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
                raise ConfigError(f"{name} must be in {where}, got {v}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")

    def _check_loss(self) -> None:
        from .._validation import check_loss_hparams
        from ..ops.sequence_logps import LogpsOptions

        try:
            check_loss_hparams(beta=self.beta, gamma_beta_ratio=self.gamma_beta_ratio, alpha=self.alpha,
                               ema_momentum=self.ema_momentum, label_smoothing=self.label_smoothing, std_eps=1e-8,
                               softcap=None)
            LogpsOptions(memory=self.memory)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc).splitlines()[0]) from exc
        if not (math.isfinite(self.nll_weight) and self.nll_weight >= 0):
            raise ConfigError(f"nll_weight must be a finite number >= 0, got {self.nll_weight}")
        if self.loss_type == "ipo" and self.label_smoothing > 0:
            raise ConfigError("label_smoothing applies to the -log sigmoid losses (alpha_dpo, simpo, sigmoid), "
                              "not to ipo")

    def _check_machine(self) -> None:
        """What this machine must have for the chosen backend and optimizer (a multi-process launch checks it in
        every process)."""
        if self.backend in ("triton", "cublas"):
            from .. import backends

            have = backends()
            if self.backend == "triton" and not (have["triton"] or have["triton_interpreter"]):
                import torch

                why = "no CUDA device is available here" if not torch.cuda.is_available() else \
                    "the triton package is not installed"
                raise ConfigError(f"backend 'triton' cannot run: {why}; use --backend auto or torch (or set "
                                  "TRITON_INTERPRET=1 to run the Triton kernels in the interpreter, slowly)")
            if self.backend == "cublas" and not have["cublas"]:
                why = ("the CUDA extension alphadpo_kernels._C_cuda was not built" if not have["cuda_epilogue"]
                       else "no CUDA device is available here")
                raise ConfigError(f"backend 'cublas' cannot run: {why}; use --backend auto or torch")
        plugin = launched_plugin()
        if plugin == "fsdp":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("accelerate's FSDP plugin needs GPUs (accelerate enables FSDP only for GPU "
                                  "process groups; on a CPU it would run independent copies of the job): launch "
                                  "plain data parallel (torchrun / accelerate launch without FSDP) or DeepSpeed")
        if plugin == "deepspeed":
            if importlib.util.find_spec("deepspeed") is None:
                raise ConfigError("this run was launched with DeepSpeed (accelerate's DEEPSPEED config), but deepspeed "
                                  "is not installed: pip install deepspeed")
            if self.weights_dtype != "fp32" or self.optimizer != "adamw":
                raise ConfigError("under DeepSpeed keep --weights-dtype fp32 and --optimizer adamw: the ZeRO optimizer "
                                  "already keeps float32 master weights and Adam states, and computes in bf16 with "
                                  "accelerate's mixed_precision bf16")
        if self.optimizer == "adamw_kahan" and importlib.util.find_spec("optimi") is None:
            raise ConfigError("optimizer 'adamw_kahan' needs torch-optimi (pip install torch-optimi, or the "
                              "package's [train] extra)")


def launched_plugin() -> str | None:
    """``"deepspeed"`` or ``"fsdp"`` when ``accelerate launch`` (its environment variables) asks for that plugin."""
    for name, var in (("deepspeed", "ACCELERATE_USE_DEEPSPEED"), ("fsdp", "ACCELERATE_USE_FSDP")):
        if os.environ.get(var, "false").strip().lower() in ("1", "true", "yes"):
            return name
    return None


_KIND = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def _kind(f: dataclasses.Field) -> str:
    t = str(f.type)
    return next(k for k in ("bool", "int", "float", "str") if k in t)


def _typed(f: dataclasses.Field, value):
    """A YAML value (or a keyword argument) checked against the field's type; ints are accepted for floats."""
    kind = _kind(f)
    if value is None and "None" in str(f.type):
        return value
    if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str)}[kind]
    if not ok:
        raise ConfigError(f"{f.name} must be {_KIND[kind]}, got {value!r}")
    return float(value) if kind == "float" else value


def _looks_like_hub_name(path: str) -> bool:
    name = path.partition(":")[0]
    return name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith((".json", ".jsonl"))


def _bool(text: str) -> bool:
    """``true`` or ``false`` (any case), exactly what ``--help`` shows: no ``yes`` / ``1`` / ``on`` aliases."""
    value = text.strip().lower()
    if value == "true":
        return True
    if value == "false":
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(f: dataclasses.Field):
    return {"bool": _bool, "int": int, "float": float, "str": str}[_kind(f)]


def _help(f: dataclasses.Field) -> str:
    """The field's help with its default appended once: not when the text already says what the default is, and
    not for an unset (None) default, which the text describes."""
    text = f.metadata["help"]
    if "(default:" in text or f.default is None:
        return text
    default = str(f.default).lower() if isinstance(f.default, bool) else f.default
    return f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-6" (and "-inf") for an option, not a negative value; no flag here looks like a number
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$", re.I)

    def error(self, message: str):  # one line, exit status 2 (argparse's own status for usage errors)
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alphadpo-train", allow_abbrev=False,
                     description="α-DPO (SimPO, DPO, IPO) training on transformers + accelerate with the fused loss. "
                                 "Every flag is also a YAML key of CONFIG (with _ for -); flags override the file.")
    parser.add_argument("config", nargs="?", help="YAML file of these fields (examples/configs/ has the released ones)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text, choices = f.metadata["help"], f.metadata["choices"]
        if f.name == "demo":
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            metavar = "{true,false}" if _flag_type(f) is _bool else None
            parser.add_argument(flag, type=_flag_type(f), default=None, dest=f.name, choices=choices,
                                metavar=metavar, help=_help(f))
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """``alphadpo-train [CONFIG.yaml] [--field value ...]``: flags override the YAML file."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        if not os.path.isfile(args.config):
            raise ConfigError(f"config file {args.config!r} does not exist")
        with open(args.config) as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{args.config} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config} must hold a mapping of TrainConfig keys, got {type(loaded).__name__}")
        known = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
        unknown = set(loaded) - known
        if unknown:
            raise ConfigError(f"unknown keys in {args.config}: {sorted(unknown)} (see alphadpo-train --help)")
        values.update(loaded)
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None and not (f.name == "demo" and v is False):
            values[f.name] = v
    cfg = TrainConfig(**values)
    if cfg.demo:
        from .demo import demo_overrides

        cfg = dataclasses.replace(cfg, **{k: v for k, v in demo_overrides().items() if k not in values or k == "demo"})
    return cfg.validate()
