"""``alphadpo-train``: α-DPO (or SimPO / DPO / IPO) training on transformers + accelerate with the fused loss.

    alphadpo-train --demo --output-dir DIR                      # the embedded demo, CPU, no downloads
    alphadpo-train config.yaml                                  # a real run (see README for the YAML keys)
    accelerate launch -m alphadpo_kernels.train config.yaml     # data parallel / FSDP / DeepSpeed via accelerate

Writes ``DIR/metrics.jsonl`` (one JSON object per log / eval event, the released trainer's metric names under
``train/`` and ``eval/``), ``DIR/summary.json``, checkpoints ``DIR/checkpoint-STEP`` (model, optimizer,
scheduler, RNG, data position, margin statistics) and the final model in ``DIR/final``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import glob
import importlib.util
import json
import math
import os
import shutil
import time

import torch

from ..loss import FusedAlphaDPOLoss
from ..ops.sequence_logps import LogpsOptions
from .config import ConfigError, TrainConfig, launched_plugin, parse_config
from .data import (
    TOKENIZED_FORMAT,
    EpochSampler,
    PreferenceCollator,
    PreferenceDataset,
    load_pairs,
    source_fingerprint,
    tokenizer_fingerprint,
)
from .modeling import PreferenceModel, check_padding_free, disable_dropout, head_transform_of, verify_head
from .parallel import accelerator_kwargs, check_attention, parallelism_config
from .parallel import setup as setup_parallel
from .reference import (
    cache_key,
    precompute_reference,
    prepare_reference,
    reference_placement,
    weights_fingerprint,
)

METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")


def _load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.chat_template:  # the released Gemma-2 / Mistral runs override the hub's template
        template = cfg.chat_template
        if os.path.isfile(template):
            with open(template) as f:
                template = f.read()
        tok.chat_template = template
    return tok


def _weights_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the weights are stored and updated in (float32 master weights by default); the compute dtype is
    accelerate's mixed precision (autocast)."""
    return {"bf16": torch.bfloat16}.get(cfg.weights_dtype, torch.float32)


def _make_optimizer(cfg: TrainConfig, params):
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_kahan":
        try:
            import optimi
        except ImportError as exc:
            raise ImportError("optimizer='adamw_kahan' needs torch-optimi (pip install torch-optimi, or the "
                              "package's [train] extra)") from exc
        # torch AdamW's eps and PyTorch-style decoupled weight decay, so that only the rounding differs
        return optimi.AdamW(params, eps=1e-8, kahan_sum=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _from_pretrained(cfg: TrainConfig, path: str, tp_mesh=None):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if tp_mesh is not None:  # the model's own tp_plan: the LM head becomes a DTensor Shard(0) on the vocabulary
        kwargs.update(tp_plan="auto", device_mesh=tp_mesh)
    return AutoModelForCausalLM.from_pretrained(path, dtype=_weights_dtype(cfg), **kwargs)


def _load_policy(cfg: TrainConfig, tokenizer, accelerator=None, tp_mesh=None):
    if cfg.demo and cfg.model_name_or_path is None:
        from .demo import build_demo_model

        plugin = getattr(accelerator.state, "deepspeed_plugin", None) if accelerator is not None else None
        if (plugin is None or not plugin.zero3_init_flag) and tp_mesh is None:
            model = build_demo_model(len(tokenizer), cfg.seed)
        else:
            # ZeRO-3 partitions weights as they are loaded, tensor parallelism shards them: the demo's model is built
            # whole (the same weights as in every other setup; built partitioned, it would be initialised
            # differently), saved once, and loaded like any checkpoint; the reference is loaded from the same folder
            path = os.path.join(cfg.output_dir, "demo-model")
            with accelerator.main_process_first():
                if accelerator.is_main_process:
                    with _without_zero3_init():
                        build_demo_model(len(tokenizer), cfg.seed).save_pretrained(path)
            model = _from_pretrained(cfg, path, tp_mesh)
    else:
        model = _from_pretrained(cfg, cfg.model_name_or_path, tp_mesh)
    return disable_dropout(model.to(_weights_dtype(cfg)))


@contextlib.contextmanager
def _without_zero3_init():
    """transformers builds models partitioned (``deepspeed.zero.Init``) while its DeepSpeed config weakref is set
    and says ZeRO-3; this unsets it for the block (accelerate's ``zero3_init_context_manager`` leaves it set)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _load_reference(cfg: TrainConfig, policy_at_start, tp_mesh=None):
    path = cfg.ref_model_name_or_path or cfg.model_name_or_path
    if path is None and (tp_mesh is not None or any(hasattr(p, "ds_id") for p in policy_at_start.parameters())):
        path = policy_at_start.config._name_or_path  # the demo's model under ZeRO-3 / tp, loaded from its folder
    # a loaded policy's reference is loaded again (under ZeRO-3 both are partitioned at construction, and a
    # partitioned module cannot be copied); the demo's model, built whole, is copied
    ref = copy.deepcopy(policy_at_start) if path is None else disable_dropout(_from_pretrained(cfg, path, tp_mesh))
    # the policy's dtype, run under the same autocast on the same batches: at step 0 the policy and reference
    # log-probs are then the same numbers and every margin is exactly 0, not rounding noise α-DPO would normalise
    ref.requires_grad_(False)
    return ref.eval()


def apply_lora(cfg: TrainConfig, policy):
    """The policy with PEFT LoRA adapters (only they train; the LM head stays frozen, so the fused loss's backward
    computes ``dH`` only)."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    if targets is not None and targets.strip() != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    elif targets is not None:
        targets = "all-linear"
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)  # the adapters' initialisation
    return get_peft_model(policy, config)


def _split_eval(cfg: TrainConfig, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    if cfg.eval_file:
        return rows, load_pairs(cfg.eval_file, default_split="test")
    if cfg.eval_fraction <= 0:
        return rows, []
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(rows), generator=g).tolist()
    n_eval = max(1, int(len(rows) * cfg.eval_fraction))
    return [rows[i] for i in perm[n_eval:]], [rows[i] for i in perm[:n_eval]]


def build_datasets(cfg: TrainConfig, tokenizer, accelerator):
    """Tokenized train / eval sets, built once by the main process into ``OUTPUT_DIR/tokenized/KEY/`` (flat numpy
    arrays) and memory-mapped by every process: no rank holds its own Python copy of the tokenized data."""
    parts = {"format": TOKENIZED_FORMAT, "train": source_fingerprint(cfg.train_file),
             "eval": source_fingerprint(cfg.eval_file) if cfg.eval_file else None,
             "eval_fraction": cfg.eval_fraction, "seed": cfg.seed, "tokenizer": tokenizer_fingerprint(tokenizer),
             "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}
    key = cache_key(parts)
    root = os.path.join(cfg.output_dir, "tokenized", key)
    splits: dict = {}

    def rows():
        if not splits:
            splits["train"], splits["eval"] = _split_eval(cfg, load_pairs(cfg.train_file))
        return splits

    def build(name):
        return PreferenceDataset(rows()[name], tokenizer, cfg.max_length, cfg.max_prompt_length)

    with accelerator.main_process_first():
        train_ds = PreferenceDataset.cached(os.path.join(root, "train"), lambda: build("train"))
        has_eval = bool(cfg.eval_file) or cfg.eval_fraction > 0
        eval_ds = PreferenceDataset.cached(os.path.join(root, "eval"), lambda: build("eval")) if has_eval else None
    return train_ds, (eval_ds if eval_ds is not None and len(eval_ds) else None)


def _previous_run(output_dir: str) -> list[str]:
    """What a finished or interrupted run left in ``output_dir`` (not the keyed data / reference caches)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n in ("metrics.jsonl", "summary.json", "final") or n.startswith("checkpoint-"))


def _first_missing(path: str) -> str | None:
    """The outermost folder of ``path`` that does not exist yet (what ``os.makedirs(path)`` creates), or None."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return None
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def _latest_checkpoint(output_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(output_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    return found[-1] if found else None


class _MetricLog:
    """JSONL metrics (main process), plus TensorBoard through accelerate when it is installed."""

    def __init__(self, accelerator, path: str):
        self.accelerator, self.path = accelerator, path

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))


def plan_steps(batches_per_epoch: int, cfg: TrainConfig) -> tuple[int, int]:
    """``(optimizer steps per epoch, total steps)`` as transformers' Trainer counts them (the released stack): an
    epoch's trailing micro-batches that do not fill an accumulation window are not trained on."""
    per_epoch = max(1, batches_per_epoch // cfg.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(per_epoch * cfg.num_train_epochs))
    return per_epoch, total


def _epoch_loader(accelerator, loader, epoch: int, skip: int = 0):
    """The prepared loader for ``epoch``, first ``skip`` batches left out. accelerate's loader re-sets its sampler's
    epoch from its own counter on every pass, so the epoch is set on the loader itself."""
    loader = accelerator.skip_first_batches(loader, skip) if skip else loader
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return loader


def _device_kwargs() -> dict:
    """How the Accelerator picks its devices and process-group backend. On GPUs, accelerate's default (NCCL). On a
    CPU, a plain multi-process launch needs ``cpu=True`` (accelerate then uses gloo), but ``cpu=True`` also switches
    the DeepSpeed and FSDP plugins off, so that a ZeRO-3 launch would silently run independent copies of the whole
    job: those launches keep the plugin and get gloo explicitly."""
    if torch.cuda.is_available():
        return {}
    if launched_plugin() is not None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def _fill_deepspeed_config(accelerator, cfg: TrainConfig) -> None:
    """The DeepSpeed config's ``"auto"`` entries that depend on this trainer's flags (micro-batch, clipping); a fixed
    value that contradicts a flag is refused, as the run would otherwise differ from its own log of its settings."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size),
                       ("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
                       ("gradient_clipping", cfg.max_grad_norm)):
        have = ds.get(key, "auto")
        if have in (None, "auto"):
            ds[key] = value
        elif float(have) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}={have}, this run's flags {value}: make them agree "
                              "(or set it to \"auto\" in the DeepSpeed config)")


def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    # every user error before any work: the values first (parse_config has run them; a caller may not have),
    # then the output folder; nothing is written and no model is built until both pass
    cfg = cfg.validate()
    previous = _previous_run(cfg.output_dir)
    if previous and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"{cfg.output_dir} holds a previous run ({', '.join(previous)}): pass --resume latest to "
                          "continue it, --overwrite true to start afresh there, or another --output-dir")
    if cfg.resume == "latest" and _latest_checkpoint(cfg.output_dir) is None:
        raise ConfigError(f"--resume latest: no checkpoint-* folder in {cfg.output_dir}")
    created = _first_missing(cfg.output_dir)  # the folder this run creates (None: it exists), removed on a load error
    os.makedirs(cfg.output_dir, exist_ok=True)
    has_tb = importlib.util.find_spec("tensorboard") is not None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pc = parallelism_config(cfg, world)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with="tensorboard" if has_tb else None,
                              project_dir=cfg.output_dir, **_device_kwargs(), **accelerator_kwargs(pc))
    _fill_deepspeed_config(accelerator, cfg)
    if world > 1 and (accelerator.num_processes != world or accelerator.distributed_type == DistributedType.NO):
        raise ConfigError(f"launched as {world} processes, but accelerate set up {accelerator.distributed_type} over "
                          f"{accelerator.num_processes}: each process would train its own copy of the job")
    par = setup_parallel(accelerator, pc)  # None without cp / tp
    tp_mesh = par.tp_mesh if par is not None else None
    set_seed(cfg.seed)
    started = time.time()
    if previous and cfg.overwrite and not cfg.resume:
        if accelerator.is_main_process:  # the run's own outputs; the keyed caches stay valid and are kept
            for name in previous:
                path = os.path.join(cfg.output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        accelerator.wait_for_everyone()

    def load(what: str, fn, *args, errors: tuple = (OSError, ImportError, ValueError)):
        """A loader whose failure is the user's to fix (no such model or data set, no connection, a gated repo, an
        unrecognised model, a malformed data file, a missing optional package): one line, exit 2, and the output
        folder this run created is removed again."""
        try:
            return fn(*args)
        except errors as exc:
            if created and accelerator.is_main_process:
                shutil.rmtree(created, ignore_errors=True)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"cannot load {what}: {first}") from exc

    tokenizer = load(f"the tokenizer {cfg.tokenizer_name_or_path or cfg.model_name_or_path!r}", _load_tokenizer, cfg)
    train_ds, eval_ds = load("the data", build_datasets, cfg, tokenizer, accelerator)

    policy = load(f"the model {cfg.model_name_or_path!r}", _load_policy, cfg, tokenizer, accelerator, tp_mesh)
    if reference_placement(accelerator) == "plain" and tp_mesh is None:  # sharded weights: no plain forward here
        verify_head(policy)
    check_attention(policy, par.cp if par is not None else 1)
    loss_fn = FusedAlphaDPOLoss(beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, alpha=cfg.alpha,
                                loss_type=cfg.loss_type, ema_momentum=cfg.ema_momentum,
                                average_log_prob=cfg.average_log_prob, shift=True,
                                label_smoothing=cfg.label_smoothing, nll_weight=cfg.nll_weight,
                                options=LogpsOptions(memory=cfg.memory),
                                process_group=par.dp_group if par is not None else None)
    if cfg.lora_r > 0:  # the reference is then the same module with its adapters off: no second copy
        policy = load("LoRA adapters", apply_lora, cfg, policy)
        ref_model = policy if loss_fn.loss_type != "simpo" else None
    else:
        ref_model = (load(f"the reference model {cfg.ref_model_name_or_path or cfg.model_name_or_path!r}",
                          _load_reference, cfg, policy, tp_mesh) if loss_fn.loss_type != "simpo" else None)
    if cfg.gradient_checkpointing:  # non-reentrant, as the released configs; the API was renamed in transformers 5
        enable = getattr(policy, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.padding_free:
        check_padding_free(policy)
    model = PreferenceModel(policy, loss_fn, backend=cfg.backend)
    if par is not None:
        model.cp_group, model.tp_group = par.cp_group, par.tp_mesh

    collate = PreferenceCollator(tokenizer.pad_token_id, padding_free=cfg.padding_free)
    sampler = EpochSampler(len(train_ds), cfg.seed)
    train_dl = accelerator.prepare(torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.per_device_train_batch_size, sampler=sampler, collate_fn=collate))
    eval_dl = (accelerator.prepare(torch.utils.data.DataLoader(
        eval_ds, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)) if eval_ds is not None else None)
    steps_per_epoch, total_steps = plan_steps(len(train_dl), cfg)
    epochs_needed = math.ceil(total_steps * cfg.gradient_accumulation_steps / len(train_dl))

    ref_runner, train_ref, eval_ref = None, None, None
    if ref_model is not None:
        ref_runner = prepare_reference(ref_model, loss_fn, accelerator, backend=cfg.backend,
                                       micro_batch=cfg.per_device_train_batch_size, adapters_off=cfg.lora_r > 0,
                                       cp_group=par.cp_group if par else None, tp_group=tp_mesh)
        if cfg.reference_mode == "precompute":
            parts = {"weights": weights_fingerprint(ref_model),
                     "model": cfg.ref_model_name_or_path or cfg.model_name_or_path or f"demo-seed{cfg.seed}",
                     "data": train_ds.fingerprint(), "eval_data": eval_ds.fingerprint() if eval_ds else None,
                     "weights_dtype": cfg.weights_dtype, "mixed_precision": cfg.mixed_precision,
                     "attn_implementation": cfg.attn_implementation, "backend": cfg.backend,
                     "logps": dict(average=cfg.average_log_prob, head=head_transform_of(ref_model), shift=True),
                     "batching": dict(train=cfg.per_device_train_batch_size, eval=cfg.per_device_eval_batch_size,
                                      seed=cfg.seed, world=accelerator.num_processes,
                                      rank=accelerator.process_index),
                     "versions": dict(torch=torch.__version__, transformers=_version("transformers"),
                                      alphadpo_kernels=_version("alphadpo_kernels"))}
            cache = os.path.join(cfg.output_dir, "reference_logps", cache_key(parts))
            with accelerator.autocast():  # the policy's compute dtype, as in the training forward
                train_ref = precompute_reference(ref_runner, _EpochLoader(accelerator, train_dl, par),
                                                 epochs=epochs_needed,
                                                 accelerator=accelerator, cache_path=cache + "-train.pt")
                if eval_dl is not None:
                    eval_ref = precompute_reference(ref_runner, _EpochLoader(accelerator, eval_dl, par), epochs=1,
                                                    accelerator=accelerator,
                                                    cache_path=cache + "-eval.pt")[0]
            ref_runner = ref_model = None  # released: the reference model is no longer needed
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    optimizer = _make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    if par is not None and par.tp > 1 and not torch.cuda.is_available():
        # a CPU under tp over every process: nothing to reduce (each rank's shards get their whole gradients), and
        # DDP cannot hold DTensor weights, so the model is not wrapped
        optimizer = accelerator.prepare(optimizer)
        accelerator.register_for_checkpointing(model)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand, once per optimiser step
    if has_tb:
        accelerator.init_trackers("alphadpo", config={k: v for k, v in vars(cfg).items() if k != "extra"})

    log = _MetricLog(accelerator, os.path.join(cfg.output_dir, "metrics.jsonl"))
    step, epoch, batches_done = 0, 0, 0
    if cfg.resume:
        ckpt = _latest_checkpoint(cfg.output_dir) if cfg.resume == "latest" else cfg.resume
        if ckpt is None or not os.path.isdir(ckpt):
            raise ConfigError(f"--resume {cfg.resume}: no checkpoint-* folder in {cfg.output_dir}"
                              if ckpt is None else f"--resume {cfg.resume}: no such checkpoint folder")
        accelerator.load_state(ckpt)
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        accelerator.print(f"resumed from {ckpt} at step {step}")

    def with_reference(batch: dict, table, index: int) -> dict:
        if table is not None:
            ref = table[index].to(accelerator.device)
            p = ref.shape[0] // 2
            batch = dict(batch, ref_chosen_logps=ref[:p], ref_rejected_logps=ref[p:])
        return batch

    def evaluate() -> dict:
        if eval_dl is None:
            return {}
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        cols: dict[str, list] = {k: [] for k in ("chosen", "rejected", "pc", "pr", "rc", "rr", "loss")}
        with torch.no_grad():
            batches = _epoch_loader(accelerator, eval_dl, 0)
            for i, batch in enumerate(par.batches(batches) if par is not None else batches):
                out = model(with_reference(batch, eval_ref, i), ref_model=ref_runner)
                pairs = out.chosen_rewards.new_full((out.chosen_rewards.shape[0],), out.loss.item())
                vals = dict(chosen=out.chosen_rewards, rejected=out.rejected_rewards, pc=out.chosen_logps,
                            pr=out.rejected_logps, rc=out.ref_chosen_logps if out.ref_chosen_logps is not None
                            else torch.zeros_like(out.chosen_logps),
                            rr=out.ref_rejected_logps if out.ref_rejected_logps is not None
                            else torch.zeros_like(out.chosen_logps), loss=pairs)
                for k, v in vals.items():
                    cols[k].append(par.gather_for_metrics(accelerator, v.float()) if par is not None
                                   else accelerator.gather_for_metrics(v.float()))
        unwrapped.train()
        c = {k: torch.cat(v) for k, v in cols.items()}
        metrics = {"eval/loss": c["loss"].mean(), "eval/rewards/chosen": c["chosen"].mean(),
                   "eval/rewards/rejected": c["rejected"].mean(),
                   "eval/rewards/accuracies": (c["chosen"] > c["rejected"]).float().mean(),
                   "eval/rewards/margins": (c["chosen"] - c["rejected"]).mean(),
                   "eval/logps/chosen": c["pc"].mean(), "eval/logps/rejected": c["pr"].mean()}
        if loss_fn.loss_type != "simpo":
            metrics.update({"eval/logps/ref_chosen": c["rc"].mean(), "eval/logps/ref_rejected": c["rr"].mean()})
        return {k: float(v) for k, v in metrics.items()}

    def save(step: int, epoch: int, batches: int) -> None:
        path = os.path.join(cfg.output_dir, f"checkpoint-{step}")
        accelerator.save_state(path)
        if accelerator.is_main_process:
            with open(os.path.join(path, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "epoch": epoch, "batches_in_epoch": batches}, f)
            for old in sorted(glob.glob(os.path.join(cfg.output_dir, "checkpoint-*")),
                              key=lambda p: int(p.rsplit("-", 1)[1]))[: -cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    summary: dict = {}
    start_eval = evaluate() if step == 0 else {}
    if start_eval:
        log.write({"step": 0, **start_eval})
        summary.update({f"{k}@start": v for k, v in start_eval.items()})
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="alphadpo")
    # metrics summed over every micro-batch of the logging window, logged as means (HF / TRL log them so)
    sums: dict[str, torch.Tensor] = {}
    micro, grad_norm = 0, None
    done = step >= total_steps
    while not done:
        for batch in _epoch_loader(accelerator, train_dl, epoch, batches_done):
            batch = with_reference(batch, train_ref[epoch] if train_ref else None, batches_done)
            with accelerator.accumulate(model), (par.sharded(batch) if par is not None
                                                 else contextlib.nullcontext(batch)) as batch:
                out = model(batch, ref_model=ref_runner)
                # under cp the gradient reduction averages over the cp ranks too: scaled so that it sums over them
                accelerator.backward(out.loss * par.loss_scale if par is not None else out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            micro += 1
            for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                means = accelerator.reduce(torch.stack([v / micro for v in sums.values()]), reduction="mean")
                record = {"step": step, "epoch": epoch + batches_done / len(train_dl),
                          "train/learning_rate": scheduler.get_last_lr()[0]}
                record.update({f"train/{k}": float(v) for k, v in zip(sums, means)})
                if grad_norm is not None:  # the last step's norm before clipping, as transformers' Trainer logs it
                    record["train/grad_norm"] = float(grad_norm)
                unwrapped_loss = accelerator.unwrap_model(model).loss_fn
                record["train/margin_mean"] = float(unwrapped_loss.margin_mean)
                record["train/margin_std"] = float(unwrapped_loss.margin_std)
                log.write(record)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}", acc=f"{record['train/rewards/accuracies']:.2f}")
                sums, micro = {}, 0
            if eval_dl is not None and (step % cfg.eval_steps == 0) and step != total_steps:
                log.write({"step": step, **evaluate()})
            if (step % cfg.save_steps == 0 and step != total_steps) or (step == total_steps and cfg.save_final_state):
                save(step, epoch, batches_done)
            if step >= total_steps:
                done = True
                break
        else:
            epoch, batches_done = epoch + 1, 0
    bar.close()

    final_eval = evaluate()
    if final_eval:
        log.write({"step": step, **final_eval})
        summary.update(final_eval)
    summary.update({"steps": step, "seconds": round(time.time() - started, 1), "loss_type": loss_fn.loss_type,
                    "beta": cfg.beta, "gamma_beta_ratio": cfg.gamma_beta_ratio, "alpha": cfg.alpha,
                    "distributed": _distributed_summary(accelerator, loss_fn, par)})
    save_policy(accelerator, model, tokenizer, os.path.join(cfg.output_dir, "final"))
    if accelerator.is_main_process:
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    accelerator.end_training()
    return summary


def _distributed_summary(accelerator, loss_fn, par=None) -> dict:
    """How the run was actually distributed (written to summary.json: a launch that silently fell back to
    independent single-process copies shows here)."""
    out = {"type": str(accelerator.distributed_type).split(".")[-1], "num_processes": accelerator.num_processes,
           "backend": accelerator.state.backend}
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        out["zero_stage"] = int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", plugin.zero_stage))
    if par is not None:
        out.update(data_parallel=par.dp, context_parallel=par.cp, tensor_parallel=par.tp)
    if loss_fn.loss_type != "simpo":
        out["reference"] = reference_placement(accelerator)
    return out


class _EpochLoader:
    """Iterating it ``e``-th time gives epoch ``e`` of the prepared loader (for the reference precompute); each
    batch this rank's share under cp."""

    def __init__(self, accelerator, loader, par=None):
        self.accelerator, self.loader, self.par, self.epoch = accelerator, loader, par, 0

    def __iter__(self):
        loader = _epoch_loader(self.accelerator, self.loader, self.epoch)
        self.epoch += 1
        return iter(self.par.batches(loader) if self.par is not None else loader)


def save_policy(accelerator, model, tokenizer, path: str) -> None:
    """The trained policy in Hugging Face format. The full state dict is gathered on every process (required under
    FSDP and DeepSpeed ZeRO-3, where each rank holds a shard) and written by the main process only. Under DeepSpeed
    the weights written are the optimizer's float32 master weights (what ``zero_to_fp32`` recovers from a
    checkpoint), not the engine's bf16 compute copy."""
    deepspeed = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None) is not None
    state = (deepspeed_master_state_dict(model) if deepspeed
             else accelerator.get_state_dict(model))  # collective: every rank calls it
    from torch.distributed.tensor import DTensor

    # tensor-parallel shards gathered whole (collective, in the same order on every rank)
    sharded = any(isinstance(v, DTensor) for v in state.values())
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
    policy = accelerator.unwrap_model(model).policy
    # transformers' save_pretrained of a tensor-parallel model meets the other ranks at a barrier: all call it
    if accelerator.is_main_process or sharded:
        prefix = "policy."
        policy_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        policy.save_pretrained(path, state_dict=policy_state, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(path)
    accelerator.wait_for_everyone()


def deepspeed_master_state_dict(engine) -> dict[str, torch.Tensor]:
    """The engine's module's state dict, whole, its parameters as the ZeRO optimizer's float32 master copy (stage 1,
    2 or 3; collective: every rank calls it, in the same order), a parameter the optimizer does not hold as the
    gathered parameter itself; persistent buffers as they are. On every rank, on the CPU."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    full_params: dict[int, torch.Tensor] = {}
    for p in module.parameters():  # each parameter once, tied ones included
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                full = p.detach().clone()
        full_params[id(p)] = full.detach().cpu()
    state = {}
    for name, t in module.state_dict(keep_vars=True).items():
        state[name] = full_params[id(t)] if id(t) in full_params else t.detach().cpu()
    return state


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    try:
        summary = train(cfg)
    finally:
        # accelerate keeps process-wide state (mixed precision among it); the CLI owns the process, so a next
        # run in it (tests, notebooks calling main) may choose other settings
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    if "eval/rewards/accuracies" in summary:
        start = summary.get("eval/rewards/accuracies@start")
        print(f"eval/rewards/accuracies: {start if start is None else round(start, 3)} at start -> "
              f"{summary['eval/rewards/accuracies']:.3f} after {summary['steps']} steps "
              f"({summary['seconds']} s); see {cfg.output_dir}/summary.json")
    return summary


def cli() -> None:
    """Console entry point (``alphadpo-train``): exit status 0 on success (the summary is in summary.json); a user
    error (bad flag, key, value or file, a backend this machine cannot run, an output folder holding a previous run,
    a model or data set that cannot be loaded) is one line on stderr and exit status 2. Every value is checked before
    any folder is written or any model is built."""
    import sys

    try:
        main()
    except ConfigError as exc:
        print(f"alphadpo-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
