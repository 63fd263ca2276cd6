"""Reference log-probs, precomputed once per (model, data, tokenization) and cached on disk."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .data import PreferenceCollator, PreferenceDataset
from .modeling import reference_logps


def cache_key(model_id: str, data_path: str, dataset: PreferenceDataset, settings: dict) -> str:
    """Changes whenever the model, the data file, the tokenized examples or the log-prob settings change."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_id, "data": os.path.abspath(data_path), **settings}, sort_keys=True).encode())
    for item in dataset.items:
        h.update(json.dumps([item["chosen_input_ids"], item["chosen_labels"], item["rejected_input_ids"],
                             item["rejected_labels"]]).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def precompute_reference(ref_model, dataset: PreferenceDataset, loss_fn, accelerator, *, batch_size: int,
                         pad_token_id: int, cache_path: str | None, backend: str = "auto") -> torch.Tensor:
    """``[n, 2]`` (chosen, rejected) reference log-probs; each process does its share, then all gather."""
    if cache_path and os.path.exists(cache_path):
        ref = torch.load(cache_path)
        if ref.shape == (len(dataset), 2):
            return ref
    n, world, rank = len(dataset), accelerator.num_processes, accelerator.process_index
    per_rank = -(-n // world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    collate = PreferenceCollator(pad_token_id)
    ref_model.eval()
    local = torch.full((per_rank, 2), float("nan"), device=accelerator.device)
    for s in range(0, len(mine), batch_size):
        idx = mine[s: s + batch_size]
        batch = collate([dataset[i] for i in idx])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        logps = reference_logps(ref_model, batch, loss_fn, backend=backend)
        p = len(idx)
        local[s: s + p, 0], local[s: s + p, 1] = logps[:p], logps[p:]
    ref = accelerator.gather(local).cpu()[:n]
    if cache_path and accelerator.is_main_process:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        torch.save(ref, cache_path)
    return ref
