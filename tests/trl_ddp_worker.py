"""Worker for tests/test_trl.py: run under ``torchrun --nproc_per_node 2`` (gloo, CPU). Trains stock
``trl.DPOTrainer`` and ``AlphaDPOTrainer`` (DPO, summed log-probs) and an α-DPO run, and writes each rank's logged
history and α-DPO's final margin statistics to ``<out>/rank<r>.json``."""

from __future__ import annotations

import json
import os
import sys

import torch
import trl

sys.path.insert(0, os.path.dirname(__file__))
from test_trl import _common, _history, _rows  # noqa: E402

from alphadpo_kernels.integrations.trl import AlphaDPOConfig, AlphaDPOTrainer  # noqa: E402


def main(model_dir: str, out: str) -> None:
    from datasets import Dataset
    from pathlib import Path

    ds, tmp = Dataset.from_list(_rows()), Path(out)
    common = dict(per_device_train_batch_size=2)
    stock = trl.DPOTrainer(model=model_dir, train_dataset=ds,
                           args=trl.DPOConfig(**_common(tmp, "stock", loss_type="sigmoid", **common)))
    stock.train()
    ours = AlphaDPOTrainer(model=model_dir, train_dataset=ds, args=AlphaDPOConfig(
        **_common(tmp, "ours", loss_type="sigmoid", average_log_prob=False, **common)))
    ours.train()
    alpha = AlphaDPOTrainer(model=model_dir, train_dataset=ds, args=AlphaDPOConfig(**_common(tmp, "alpha", **common)))
    alpha.train()
    result = dict(world=torch.distributed.get_world_size(), stock=_history(stock), ours=_history(ours),
                  alpha=[float(alpha.alphadpo_loss.margin_mean), float(alpha.alphadpo_loss.margin_std)])
    with open(os.path.join(out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
