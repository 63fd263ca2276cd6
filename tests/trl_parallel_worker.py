"""``AlphaDPOTrainer`` under accelerate's ``ParallelismConfig`` in one process of a ``torchrun`` launch on the CPU,
for tests/test_trl_parallel.py. Writes this rank's logged history, α-DPO's final margin statistics and (rank 0)
the final weights to ``<out>``.

Two stand-ins, both for what only GPUs have: ring attention (the ``cp_gather`` attention of
tests/cp_train_worker.py: each rank gathers the cp group's keys and values), and accelerate's acceptance of a
parallelism config on CPU processes (it lists MULTI_CPU out of the distributed types it takes; here the same mesh
runs over gloo and DDP reduces the gradients over every process, as FSDP2 does over ``dp_shard_cp``). Everything
else — transformers' Trainer loop, accelerate's data loaders over the data-parallel ranks, the trainer's sharding
of the inputs, the fused loss over the cp / tp groups, the loss scaling — is the code that runs on GPUs.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from cp_train_worker import SHARDED_CALLS, register_cp_gather  # noqa: E402


def accept_cpu_parallelism_config() -> None:
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType

    validate = ParallelismConfig._validate_accelerator

    def on_cpu_too(self, accelerator):
        if accelerator.distributed_type != DistributedType.MULTI_CPU:
            return validate(self, accelerator)
        if self.total_size != accelerator.num_processes:
            raise ValueError(f"ParallelismConfig total_size ({self.total_size}) does not match num_processes "
                             f"({accelerator.num_processes})")

    ParallelismConfig._validate_accelerator = on_cpu_too


def full_state(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def refusals(model_dir: str, out: str, cases: list[dict]) -> None:
    from accelerate.parallelism_config import ParallelismConfig
    from peft import LoraConfig

    from alphadpo_kernels.integrations.trl import AlphaDPOConfig, AlphaDPOTrainer
    from test_trl_parallel import config_kwargs, datasets_in

    messages = []
    for case in cases:
        case = dict(case)
        sizes, attn, lora = case.pop("sizes"), case.pop("attn", "cp_gather"), case.pop("lora", False)
        model, metrics = case.pop("model", model_dir), case.pop("compute_metrics", False)
        kwargs = config_kwargs(out, parallelism_config=ParallelismConfig(**sizes),
                               model_init_kwargs={"attn_implementation": attn}, **case)
        extra = {"peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])} if lora else {}
        if metrics:
            extra["compute_metrics"] = lambda prediction: {}
        try:
            trainer = AlphaDPOTrainer(model=model, args=AlphaDPOConfig(**kwargs),
                                      **datasets_in(os.path.join(out, "data")), **extra)
            if metrics:
                trainer.evaluate()
        except ValueError as exc:
            messages.append(str(exc))
        else:
            messages.append(None)
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(messages, f)
    dist.barrier()
    dist.destroy_process_group()


def main(model_dir: str, out: str, spec: str) -> None:
    register_cp_gather()
    accept_cpu_parallelism_config()
    from accelerate.parallelism_config import ParallelismConfig
    from alphadpo_kernels.integrations.trl import AlphaDPOConfig, AlphaDPOTrainer
    from test_trl_parallel import config_kwargs, datasets_in

    spec = json.loads(spec)
    if "refusals" in spec:  # each a trainer that must not be built: its error message per case
        return refusals(model_dir, out, spec["refusals"])
    sizes = spec.pop("sizes")
    attn = spec.pop("attn", "cp_gather")
    eval_size = spec.pop("eval_size", 4)
    kwargs = config_kwargs(out, **spec)
    kwargs["parallelism_config"] = ParallelismConfig(**sizes)
    init = kwargs.setdefault("model_init_kwargs", {})
    if sizes.get("cp_size", 1) > 1:
        init["attn_implementation"] = attn
    if sizes.get("tp_size", 1) > 1:
        init["tp_plan"] = "auto"
    trainer = AlphaDPOTrainer(model=model_dir, args=AlphaDPOConfig(**kwargs),
                              **datasets_in(os.path.join(out, "data"), eval_size))
    trainer.train()
    rank = dist.get_rank()
    loss = trainer.alphadpo_loss
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
    result = dict(history=trainer.state.log_history, sharded_attention_calls=SHARDED_CALLS[0],
                  head_rows=(head.to_local() if hasattr(head, "to_local") else head).shape[0],
                  margin=[float(loss.margin_mean), float(loss.margin_std)] if loss.loss_type == "alpha_dpo" else None)
    state = full_state(trainer.accelerator.unwrap_model(trainer.model))
    if rank == 0:
        torch.save(state, os.path.join(out, "weights.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
