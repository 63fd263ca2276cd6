"""Training configuration: a YAML file and/or command-line flags, defaults from the released α-DPO runs
(Llama-3-8B-Instruct: β = 2.5, γ/β = 0.6, α = 0.2, lr 1e-6, batch 128, max_length 2048 / 1800, gradient
checkpointing, logging every 5 steps, evaluation every 400). The released configs themselves are shipped in
``examples/configs/``."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    # model and data
    model_name_or_path: str | None = None
    ref_model_name_or_path: str | None = None  # default: the policy's starting weights
    tokenizer_name_or_path: str | None = None  # default: the model's
    chat_template: str | None = None  # a Jinja template, or a file holding one; default: the tokenizer's
    attn_implementation: str | None = None  # e.g. flash_attention_2 (released Llama / Mistral), eager (Gemma-2)
    # JSONL / JSON / a datasets folder with prompt, chosen, rejected, or a hub data set "org/name" (":split",
    # default train for train_file, test for eval_file)
    train_file: str | None = None
    eval_file: str | None = None
    eval_fraction: float = 0.0  # hold out this share of train_file when eval_file is not given
    output_dir: str = "alphadpo-output"
    # loss (names as in the released trainer)
    loss_type: str = "alpha_dpo"
    beta: float = 2.5
    gamma_beta_ratio: float = 0.6
    alpha: float = 0.2
    ema_momentum: float = 0.9
    label_smoothing: float = 0.0
    average_log_prob: bool = True
    reference_mode: str = "precompute"  # precompute (cached on disk) | online
    # tokenization (released: keep the end of the prompt, then cut the response)
    max_length: int = 2048
    max_prompt_length: int = 1800
    # optimisation
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 16
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_ratio: float = 0.1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # optimiser steps; overrides num_train_epochs when > 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # no | bf16 | fp16: the compute dtype (autocast), not the weights'
    weights_dtype: str = "fp32"  # fp32 (master weights, the released recipe) | bf16 (needs optimizer=adamw_kahan)
    optimizer: str = "adamw"  # adamw (torch) | adamw_kahan (optimi's Kahan-compensated AdamW, for bf16 weights)
    gradient_checkpointing: bool = True  # released: true
    backend: str = "auto"
    padding_free: bool = False  # pack each micro-batch's 2P sequences into one row (position_ids restart)
    memory: str = "fast"  # the fused loss's backward: fast (4 GEMM units) | lean (5 units, <= 1.1 x its gradients)
    # bookkeeping
    logging_steps: int = 5  # released: 5; metrics are means over the window, as HF / TRL log them
    eval_steps: int = 400  # released: 400
    save_steps: int = 500  # released: 1000000 (never, over their ~470 steps); 500 also never checkpoints them
    save_final_state: bool = False  # also write a full checkpoint (optimizer, scheduler, RNG) at the end
    save_total_limit: int = 2
    seed: int = 42
    resume: str | None = None  # a checkpoint folder, or "latest" in output_dir
    demo: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.reference_mode not in ("precompute", "online"):
            raise ValueError(f"reference_mode must be 'precompute' or 'online', got {self.reference_mode!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.weights_dtype not in ("fp32", "bf16"):
            raise ValueError(f"weights_dtype must be 'fp32' or 'bf16', got {self.weights_dtype!r}")
        if self.optimizer not in ("adamw", "adamw_kahan"):
            raise ValueError(f"optimizer must be 'adamw' or 'adamw_kahan', got {self.optimizer!r}")
        if self.weights_dtype == "bf16" and self.optimizer != "adamw_kahan":
            raise ValueError(
                "weights_dtype='bf16' needs optimizer='adamw_kahan': a plain AdamW rounds each update into the bf16 "
                "weight, and at preference-training learning rates (~1e-6) an update is far below half a bf16 ulp "
                "of an ordinary weight (~1.2e-4 at |w| = 0.05), so most weights would never move while the run logs "
                "losses as usual. Use --optimizer adamw_kahan (optimi's AdamW, which carries the rounding error "
                "forward in a Kahan compensation buffer) or keep --weights-dtype fp32 (float32 master weights, "
                "bf16 compute via --mixed-precision bf16, as the released runs did)")
        if self.memory not in ("fast", "lean"):
            raise ValueError(f"memory must be 'fast' or 'lean', got {self.memory!r}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        if not self.demo and (self.model_name_or_path is None or self.train_file is None):
            raise ValueError("model_name_or_path and train_file are required (or pass --demo)")
        return self


def _flag_type(f: dataclasses.Field):
    t = str(f.type)
    if "bool" in t:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """``alphadpo-train [CONFIG.yaml] [--field value ...]``: flags override the YAML file."""
    parser = argparse.ArgumentParser(prog="alphadpo-train", description="α-DPO training with fused kernels")
    parser.add_argument("config", nargs="?", help="YAML file with TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "demo":
            parser.add_argument(flag, action="store_true", help="train the embedded demo (no downloads, CPU)")
        else:
            parser.add_argument(flag, type=_flag_type(f), default=None, dest=f.name)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(loaded) - known
        if unknown:
            raise ValueError(f"unknown keys in {args.config}: {sorted(unknown)}")
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
