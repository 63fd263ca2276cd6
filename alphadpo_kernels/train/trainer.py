"""``alphadpo-train``: α-DPO (or SimPO / DPO / IPO) training on transformers + accelerate with the fused loss.

    alphadpo-train --demo --output-dir DIR                      # the embedded demo, CPU, no downloads
    alphadpo-train config.yaml                                  # a real run (see README for the YAML keys)
    accelerate launch -m alphadpo_kernels.train config.yaml     # data parallel / FSDP / DeepSpeed via accelerate

Writes ``DIR/metrics.jsonl`` (one JSON object per log / eval event, the released trainer's metric names under
``train/`` and ``eval/``), ``DIR/summary.json``, checkpoints ``DIR/checkpoint-STEP`` (model, optimizer,
scheduler, RNG, data position, margin statistics) and the final model in ``DIR/final``.
"""

from __future__ import annotations

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
from .config import TrainConfig, parse_config
from .data import EpochSampler, PreferenceCollator, PreferenceDataset, load_pairs
from .modeling import PreferenceModel, softcap_of
from .reference import cache_key, precompute_reference

METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")


def _load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
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


def _load_policy(cfg: TrainConfig, tokenizer):
    if cfg.demo and cfg.model_name_or_path is None:
        from .demo import build_demo_model

        return build_demo_model(len(tokenizer), cfg.seed)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=_weights_dtype(cfg))


def _load_reference(cfg: TrainConfig, policy_at_start):
    path = cfg.ref_model_name_or_path or (None if cfg.demo else cfg.model_name_or_path)
    if path is None:
        ref = copy.deepcopy(policy_at_start)
    else:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(path, dtype=_weights_dtype(cfg))
    # the policy's dtype, run under the same autocast: at step 0 the policy and reference log-probs are then the
    # same numbers and every margin is exactly 0, not bf16-vs-fp32 rounding noise that α-DPO would normalise
    ref.requires_grad_(False)
    return ref.eval()


def _split_eval(cfg: TrainConfig, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    if cfg.eval_file:
        return rows, load_pairs(cfg.eval_file)
    if cfg.eval_fraction <= 0:
        return rows, []
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(rows), generator=g).tolist()
    n_eval = max(1, int(len(rows) * cfg.eval_fraction))
    return [rows[i] for i in perm[n_eval:]], [rows[i] for i in perm[:n_eval]]


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


def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    os.makedirs(cfg.output_dir, exist_ok=True)
    has_tb = importlib.util.find_spec("tensorboard") is not None
    # cpu=True without CUDA: only then does accelerate pick up a multi-process CPU (gloo) launch.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with="tensorboard" if has_tb else None,
                              project_dir=cfg.output_dir)
    set_seed(cfg.seed)
    started = time.time()

    tokenizer = _load_tokenizer(cfg)
    train_rows, eval_rows = _split_eval(cfg, load_pairs(cfg.train_file))
    train_ds = PreferenceDataset(train_rows, tokenizer, cfg.max_length, cfg.max_prompt_length)
    eval_ds = PreferenceDataset(eval_rows, tokenizer, cfg.max_length, cfg.max_prompt_length) if eval_rows else None

    policy = _load_policy(cfg, tokenizer).to(_weights_dtype(cfg))
    loss_fn = FusedAlphaDPOLoss(beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, alpha=cfg.alpha,
                                loss_type=cfg.loss_type, ema_momentum=cfg.ema_momentum,
                                average_log_prob=cfg.average_log_prob, shift=True,
                                label_smoothing=cfg.label_smoothing, options=LogpsOptions(memory=cfg.memory))
    ref_model = None
    if loss_fn.loss_type != "simpo":
        ref_model = _load_reference(cfg, policy).to(accelerator.device)
        if cfg.reference_mode == "precompute":
            settings = dict(average=cfg.average_log_prob, softcap=softcap_of(ref_model), shift=True,
                            weights_dtype=cfg.weights_dtype, mixed_precision=cfg.mixed_precision)
            model_id = cfg.ref_model_name_or_path or cfg.model_name_or_path or f"demo-seed{cfg.seed}"
            for name, ds, path in (("train", train_ds, cfg.train_file), ("eval", eval_ds, cfg.eval_file or cfg.train_file)):
                if ds is None:
                    continue
                key = cache_key(model_id, path, ds, settings)
                with accelerator.autocast():  # the policy's compute dtype, as in the training forward
                    ds.ref = precompute_reference(
                        ref_model, ds, loss_fn, accelerator, batch_size=cfg.per_device_eval_batch_size,
                        pad_token_id=tokenizer.pad_token_id, backend=cfg.backend,
                        cache_path=os.path.join(cfg.output_dir, "reference_logps", f"{name}-{key}.pt"))
            ref_model = None  # released: the reference model is no longer needed
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            ref_model = accelerator.prepare_model(ref_model, evaluation_mode=True)

    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PreferenceModel(policy, loss_fn, backend=cfg.backend)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    sampler = EpochSampler(len(train_ds), cfg.seed)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=cfg.per_device_train_batch_size, sampler=sampler,
                                           collate_fn=collate)
    eval_dl = (torch.utils.data.DataLoader(eval_ds, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)
               if eval_ds is not None else None)
    optimizer = _make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    steps_per_epoch = max(1, math.ceil(len(train_dl) / cfg.gradient_accumulation_steps))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_train_epochs)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand, once per optimiser step
    if has_tb:
        accelerator.init_trackers("alphadpo", config={k: v for k, v in vars(cfg).items() if k != "extra"})

    log = _MetricLog(accelerator, os.path.join(cfg.output_dir, "metrics.jsonl"))
    step, epoch, batches_done = 0, 0, 0
    if cfg.resume:
        ckpt = _latest_checkpoint(cfg.output_dir) if cfg.resume == "latest" else cfg.resume
        if ckpt is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {cfg.output_dir}")
        accelerator.load_state(ckpt)
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        accelerator.print(f"resumed from {ckpt} at step {step}")

    def evaluate() -> dict:
        if eval_dl is None:
            return {}
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        cols: dict[str, list] = {k: [] for k in ("chosen", "rejected", "pc", "pr", "rc", "rr", "loss")}
        with torch.no_grad():
            for batch in eval_dl:
                out = model(batch, ref_model=ref_model)
                pairs = out.chosen_rewards.new_full((out.chosen_rewards.shape[0],), out.loss.item())
                vals = dict(chosen=out.chosen_rewards, rejected=out.rejected_rewards, pc=out.chosen_logps,
                            pr=out.rejected_logps, rc=out.ref_chosen_logps if out.ref_chosen_logps is not None
                            else torch.zeros_like(out.chosen_logps),
                            rr=out.ref_rejected_logps if out.ref_rejected_logps is not None
                            else torch.zeros_like(out.chosen_logps), loss=pairs)
                for k, v in vals.items():
                    cols[k].append(accelerator.gather_for_metrics(v.float()))
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
    sums: dict[str, torch.Tensor] = {}
    micro = 0
    done = step >= total_steps
    while not done:
        sampler.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dl, batches_done) if batches_done else train_dl
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(batch, ref_model=ref_model)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
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
                unwrapped_loss = accelerator.unwrap_model(model).loss_fn
                record["train/margin_mean"] = float(unwrapped_loss.margin_mean)
                record["train/margin_std"] = float(unwrapped_loss.margin_std)
                log.write(record)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}", acc=f"{record['train/rewards/accuracies']:.2f}")
            sums, micro = {}, 0
            if eval_dl is not None and (step % cfg.eval_steps == 0) and step != total_steps:
                log.write({"step": step, **evaluate()})
            if step % cfg.save_steps == 0 or step == total_steps:
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
                    "beta": cfg.beta, "gamma_beta_ratio": cfg.gamma_beta_ratio, "alpha": cfg.alpha})
    if accelerator.is_main_process:
        final = os.path.join(cfg.output_dir, "final")
        accelerator.unwrap_model(model).policy.save_pretrained(final)
        tokenizer.save_pretrained(final)
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    summary = train(cfg)
    if "eval/rewards/accuracies" in summary:
        start = summary.get("eval/rewards/accuracies@start")
        print(f"eval/rewards/accuracies: {start if start is None else round(start, 3)} at start -> "
              f"{summary['eval/rewards/accuracies']:.3f} after {summary['steps']} steps "
              f"({summary['seconds']} s); see {cfg.output_dir}/summary.json")
    return summary


def cli() -> None:
    """Console entry point (``alphadpo-train``): exit status 0 on success, the summary is in summary.json."""
    main()
