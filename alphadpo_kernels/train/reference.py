"""The reference model: placed for the run's distributed setup, and its log-probs precomputed batch by batch.

**Same batches as the policy.** In bf16 a sequence's log-prob depends on the batch it is computed in (its shape,
its padding): the same pair scored in an eval-sized batch and in a training batch can differ by 1e-3. α-DPO
normalises the policy/reference margins by their running standard deviation, so that noise would become per-pair
weights exactly when policy == reference should give zeros. The precompute therefore walks the *prepared*
training loader itself, epoch by epoch (the sampler is deterministic), and stores one tensor per micro-batch:
training then looks its reference up by (epoch, batch), computed on the very tensors it trains on. Eval likewise.
Each process keeps the batches it will see (accelerate shards them), so no gather is needed.

**Placement.** The reference is inference only. Single device and DDP: the module as it is. FSDP: wrapped by
accelerate like the policy (``evaluation_mode``) inside a small module whose forward is the whole computation, so
the root's unshard hooks fire. DeepSpeed ZeRO-3: ``from_pretrained`` partitions its weights, so it gets its own
ZeRO-3 inference engine (no optimizer), as TRL does; other DeepSpeed stages keep whole weights on every rank.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os

import torch
from torch import nn

from .modeling import reference_logps


class ReferenceModel(nn.Module):
    """``forward(batch) -> [2P]`` reference log-probs: one module whose call is the whole computation, so that
    FSDP / ZeRO-3 hooks gather what it needs."""

    def __init__(self, model: nn.Module, loss_fn, backend: str = "auto", adapters_off: bool = False):
        super().__init__()
        self.model, self.backend, self.adapters_off = model, backend, adapters_off
        self.cp_group = self.tp_group = None  # as the policy's PreferenceModel (train/parallel.py)
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # for accelerate's FSDP auto-wrap
        self._loss_fn = [loss_fn]  # not a submodule: the policy's module owns the margin buffers

    @torch.no_grad()
    def forward(self, batch: dict) -> torch.Tensor:
        if self.adapters_off:  # LoRA: the policy's own module with its adapters switched off is the reference
            was_training = self.model.training
            self.model.eval()
            try:
                with self.model.disable_adapter():
                    return reference_logps(self.model, batch, self._loss_fn[0], backend=self.backend,
                                           cp_group=self.cp_group, tp_group=self.tp_group)
            finally:
                self.model.train(was_training)
        return reference_logps(self.model, batch, self._loss_fn[0], backend=self.backend, cp_group=self.cp_group,
                               tp_group=self.tp_group)


def reference_placement(accelerator) -> str:
    """``"plain"``, ``"fsdp"`` or ``"deepspeed-zero3"``: how the reference must be run in this setup."""
    from accelerate.utils import DistributedType

    kind = accelerator.state.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", plugin.zero_stage)
        return "deepspeed-zero3" if int(stage) == 3 else "plain"
    return "plain"


def zero3_inference_config(ds_config: dict, hidden_size: int, micro_batch: int, world_size: int,
                           mixed_precision: str = "no") -> dict:
    """A DeepSpeed config for an inference-only ZeRO-3 engine from the run's own config: no optimizer or
    scheduler, and the ``"auto"`` entries that accelerate would fill for a trained model filled here (the compute
    dtype from the run's ``mixed_precision``, so that the reference runs in the policy's dtype)."""
    cfg = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = 3
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_param_persistence_threshold", 10 * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))):
        if zero.get(key) in (None, "auto"):
            zero[key] = value
    for key in ("offload_optimizer",):
        zero.pop(key, None)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = micro_batch * world_size
    cfg.pop("gradient_clipping", None)
    for dtype_key in ("bf16", "fp16"):
        if isinstance(cfg.get(dtype_key), dict) and cfg[dtype_key].get("enabled") == "auto":
            cfg[dtype_key]["enabled"] = mixed_precision == dtype_key
    return cfg


def prepare_reference(ref_model: nn.Module, loss_fn, accelerator, *, backend: str, micro_batch: int,
                      adapters_off: bool = False, cp_group=None, tp_group=None) -> nn.Module:
    """The reference as a :class:`ReferenceModel` placed for this run (see the module docstring); ``adapters_off``:
    ``ref_model`` is the PEFT policy itself, run with its adapters switched off (LoRA, single process or DDP)."""
    placement = reference_placement(accelerator)
    runner = ReferenceModel(ref_model, loss_fn, backend, adapters_off=adapters_off)
    runner.cp_group, runner.tp_group = cp_group, tp_group
    if placement == "fsdp":
        return accelerator.prepare_model(runner, evaluation_mode=True)
    if placement == "deepspeed-zero3":
        import deepspeed

        cfg = zero3_inference_config(accelerator.state.deepspeed_plugin.deepspeed_config,
                                     ref_model.config.hidden_size, micro_batch, accelerator.num_processes,
                                     str(accelerator.state.mixed_precision))
        engine, *_ = deepspeed.initialize(model=runner, config=cfg)
        engine.eval()
        return engine
    return runner.to(accelerator.device)


def weights_fingerprint(model: nn.Module) -> str:
    """Shape, dtype, the float64 sum and a strided sample of every parameter and buffer: tells checkpoints apart
    at the cost of one pass over the weights."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if hasattr(t, "ds_id"):  # ZeRO-3 partitioned (every rank runs this, in the same order): gathered
                import deepspeed

                with deepspeed.zero.GatheredParameters([t]):
                    flat = t.detach().reshape(-1).clone()
            else:  # a tensor-parallel DTensor: this rank's shard (the key holds the rank)
                flat = (t.to_local() if hasattr(t, "to_local") else t).detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].double().cpu()
            h.update(json.dumps([name, list(t.shape), str(t.dtype), float(flat.double().sum())]).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


def cache_key(parts: dict) -> str:
    """Hash of everything that changes the reference numbers (model weights, data, tokenization, dtypes,
    precision, library versions, log-prob settings, batching, process rank)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def precompute_reference(runner: nn.Module, loader, *, epochs: int, accelerator,
                         cache_path: str | None) -> list[list[torch.Tensor]]:
    """``[epoch][batch] -> [2P]`` reference log-probs for the batches this process will train on, in order.

    ``loader`` gives epoch ``e``'s batches, in the training loop's order, the ``e``-th time it is iterated (the
    trainer's ``_EpochLoader``). Runs under the policy's autocast (the caller's ``accelerator.autocast()``).
    """
    if cache_path and os.path.exists(cache_path):
        table = torch.load(cache_path)
        if len(table) >= epochs:
            return table
    runner.eval()
    table = []
    for _ in range(epochs):
        table.append([runner(batch).float().cpu() for batch in loader])
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = cache_path + f".tmp{os.getpid()}"
        torch.save(table, tmp)
        os.replace(tmp, cache_path)
    return table
