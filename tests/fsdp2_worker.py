"""Run by tests/test_fsdp2.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): FSDP2 (``fully_shard``) on a tiny
Llama with the fused α-DPO loss called inside the root module's forward, against one unsharded process.

Each rank trains on its half of a 4-pair global batch; the sharded loss (mean over ranks) and the full gradients
(gathered from the shards) must equal one process's on the whole batch, for two forms of the call: the
trainer's own glue (``PreferenceModel``) and a user's module that passes ``lm_head.weight`` to the loss in its
forward. Writes ``{"ok": ..., "errors": [...]}`` to the path in argv[1] on rank 0.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig

from alphadpo_kernels import FusedAlphaDPOLoss
from alphadpo_kernels.train.data import PreferenceCollator
from alphadpo_kernels.train.modeling import PreferenceModel


class UserModule(torch.nn.Module):
    """What a user writes: the decoder, then the fused loss on lm_head.weight, all inside one forward."""

    def __init__(self, lm, group=None):
        super().__init__()
        self.lm = lm
        self.loss_fn = FusedAlphaDPOLoss(shift=True, process_group=group)

    def forward(self, batch):
        hidden = self.lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.loss_fn(hidden, self.lm.lm_head.weight, batch["labels"], backend="torch",
                            ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"])


def batch_of(pairs):
    g = torch.Generator().manual_seed(7)
    items = []
    for i in range(4):
        prompt = torch.randint(1, 61, (3 + i % 2,), generator=g).tolist()
        seqs = {}
        for key in ("chosen", "rejected"):
            ans = torch.randint(1, 61, (4 + i,), generator=g).tolist()
            seqs[f"{key}_input_ids"], seqs[f"{key}_labels"] = prompt + ans, [-100] * len(prompt) + ans
        items.append(dict(seqs, index=i))
    b = PreferenceCollator(0)([items[i] for i in pairs])
    ref = torch.tensor([-4.0, -4.2, -4.1, -3.9, -4.4, -4.0, -4.3, -4.1])
    b["ref_chosen_logps"] = ref[0::2][list(pairs)]
    b["ref_rejected_logps"] = ref[1::2][list(pairs)]
    return b


def steps(module, batch, n=2):
    """Two steps of plain SGD (the second sees moved weights and updated margin statistics)."""
    losses = []
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(n):
        out = module(batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for k, p in module.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, grads


def main(path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    errors = []
    solo = dist.new_group([0])  # the unsharded reference run's margin statistics: rank 0 alone
    for name, make in (("trainer glue", lambda lm, group=None: PreferenceModel(
                            lm, FusedAlphaDPOLoss(shift=True, process_group=group), backend="torch")),
                       ("user module", UserModule)):
        single = make(copy.deepcopy(base), solo) if rank == 0 else None
        single_losses, single_grads = steps(single, batch_of(range(4))) if rank == 0 else (None, None)
        sharded = make(copy.deepcopy(base))
        lm = sharded.policy if name == "trainer glue" else sharded.lm
        for layer in lm.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)  # the root: embeddings, final norm and lm_head stay DTensors outside it
        assert type(lm.lm_head.weight).__name__ == "DTensor"
        losses, grads = steps(sharded, batch_of(range(2 * rank, 2 * rank + 2)))
        if name == "user module":  # outside the root's forward the head is a shard: a clear error, not garbage
            b = batch_of(range(2))
            try:
                sharded.loss_fn(torch.randn(4, b["labels"].shape[1], 32), lm.lm_head.weight, b["labels"],
                                ref_chosen_logps=b["ref_chosen_logps"], ref_rejected_logps=b["ref_rejected_logps"])
                errors.append("a sharded lm_head.weight outside the forward was accepted")
            except TypeError as exc:
                if "weight is a sharded DTensor" not in str(exc):
                    errors.append(f"unexpected error for a sharded weight: {exc}")
        mean_losses = []
        for loss in losses:
            t = loss.clone()
            dist.all_reduce(t)
            mean_losses.append(t / world)
        if rank == 0:
            for i, (a, b) in enumerate(zip(mean_losses, single_losses)):
                if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                    errors.append(f"{name}: loss of step {i + 1}: sharded {float(a)} vs single {float(b)}")
            for k, g in grads.items():
                ref = single_grads[k]
                err = float((g - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                if not err < 1e-4:
                    errors.append(f"{name}: gradient of {k}: relative difference {err:.2e}")
    if rank == 0:
        with open(path, "w") as f:
            json.dump({"ok": not errors, "errors": errors}, f)
    # every rank reaches the end before any tears its process group down: a rank that exits while the other is
    # still in a collective makes gloo abort it ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
