"""Worker for tests/test_deepspeed.py: ``AlphaDPOTrainer`` (α-DPO) under DeepSpeed ZeRO-3, run under
``torchrun --nproc_per_node 2`` on the CPU (gloo, ``DS_ACCELERATOR=cpu``), the model loaded partitioned from
a folder and TRL's reference model in its own ZeRO-3 engine. Writes the logged history, α-DPO's final margin
statistics and (rank 0) the saved model to ``OUT``.

Without an accelerator, accelerate picks no process-group backend for a DeepSpeed launch and would run each rank
as a single process: the state is initialised with gloo first and the trainer told to use it."""

from __future__ import annotations

import json
import os
import sys

import torch

DS_CONFIG = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
             "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
COMPARED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected", "margin_mean", "margin_std")


def rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(16):
        n = 3 + i % 4
        xs = torch.randint(0, 10, (n,), generator=g).tolist()
        out.append(dict(prompt="sort these : " + " ".join(map(str, xs)), chosen=" " + " ".join(map(str, sorted(xs))),
                        rejected=" " + " ".join(map(str, xs[::-1][: n - i % 2]))))
    return out


def args(out: str, per_device: int, **kw):
    from alphadpo_kernels.integrations.trl import AlphaDPOConfig

    return AlphaDPOConfig(output_dir=out, per_device_train_batch_size=per_device, max_steps=3, learning_rate=1e-3,
                          logging_steps=1, report_to="none", save_strategy="no", seed=0, bf16=False,
                          disable_tqdm=True, **kw)


def history(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def main(model_dir: str, out: str) -> None:
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")
    from datasets import Dataset

    from alphadpo_kernels.integrations.trl import AlphaDPOTrainer

    trainer = AlphaDPOTrainer(model=model_dir, train_dataset=Dataset.from_list(rows()), args=args(
        out, 2, deepspeed=DS_CONFIG, accelerator_config={"use_configured_state": True}))
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    result = dict(world=torch.distributed.get_world_size(), history=history(trainer),
                  stage=trainer.accelerator.state.deepspeed_plugin.zero_stage,
                  stats=[float(trainer.alphadpo_loss.margin_mean), float(trainer.alphadpo_loss.margin_std)])
    with open(os.path.join(out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    # every rank reaches the end before any tears its process group down: a rank that exits while the other is
    # still in a collective makes gloo abort it ("terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
