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
import os
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
    eval_fraction: float = _f(0.0, "hold out this share of train_file for evaluation when eval_file is not given")
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
    average_log_prob: bool = _f(True, "length-normalised log-probs (ln: true in every released config)")
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
    gradient_checkpointing: bool = _f(True, "recompute activations in the backward (released: true)")
    backend: str = _f("auto", "fused-loss backend", ("auto", "triton", "torch", "cublas"))
    padding_free: bool = _f(False, "pack each micro-batch's sequences into one row (position_ids restart; no padding)")
    memory: str = _f("fast", "the fused loss's backward: fast (4 GEMM units) or lean (5 units, <= 1.1 x its "
                             "gradients)", ("fast", "lean"))
    # bookkeeping
    logging_steps: int = _f(5, "log the means of the last this-many steps (released: 5)")
    eval_steps: int = _f(400, "evaluate every this-many steps (released: 400)")
    save_steps: int = _f(500, "write a checkpoint every this-many steps (released: 1000000, i.e. never over their "
                              "~470 steps; 500 never checkpoints those either)")
    save_final_state: bool = _f(False, "also write a full checkpoint (optimizer, scheduler, RNG) at the end")
    save_total_limit: int = _f(2, "checkpoints kept")
    seed: int = _f(42, "seed of the data order and initialisation")
    resume: str | None = _f(None, "a checkpoint folder, or 'latest' in output_dir")
    demo: bool = _f(False, "train the embedded demo: a tiny Llama on a synthetic task, CPU, no downloads")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": None, "choices": None})

    def validate(self) -> "TrainConfig":
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
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                              f"({self.max_length})")
        if not self.demo and (self.model_name_or_path is None or self.train_file is None):
            raise ConfigError("model_name_or_path and train_file are required (or pass --demo)")
        for name in ("train_file", "eval_file"):
            path = getattr(self, name)
            if path and not os.path.exists(path) and not _looks_like_hub_name(path):
                raise ConfigError(f"{name} {path!r} does not exist (and is not a hub data set org/name[:split])")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "eval_steps", "save_steps", "save_total_limit", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        return self


def _looks_like_hub_name(path: str) -> bool:
    name = path.partition(":")[0]
    return name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith((".json", ".jsonl"))


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(f: dataclasses.Field):
    t = str(f.type)
    if "bool" in t:
        return _bool
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


class _Parser(argparse.ArgumentParser):
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
                                metavar=metavar, help=f"{help_text} (default: {f.default})")
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
