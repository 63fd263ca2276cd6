"""``alphadpo-train`` in one process of a ``torchrun`` launch on the CPU, for tests/test_parallel_train.py.

Context parallelism needs an attention that sees the whole sequence while each rank holds only its share of the
tokens. On GPUs that is torch's ring attention (SDPA's CUDA kernels); SDPA's CPU kernels have none, so this worker
registers an exact stand-in with transformers: each rank gathers every rank's keys and values over the cp group
(autograd-aware) and attends causally by global position, the positions following torch's head-tail layout.
Everything else — the trainer, accelerate's data loaders, torch's sharding of the inputs, the fused loss over the cp
group, the gradient scaling and reduction — is the code that runs on GPUs.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

_SDPA = F.scaled_dot_product_attention  # torch's context_parallel swaps it while the inputs are sharded


def head_tail_positions(rank: int, cp: int, local: int) -> torch.Tensor:
    chunk = local // 2
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                      torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)])


def gather_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``[B, Hq, T, D]`` queries against every cp rank's keys / values, causal by global position."""
    local = query.shape[2]
    if F.scaled_dot_product_attention is not _SDPA:  # inside context_parallel: this rank holds its share
        import torch.distributed.nn.functional as dnn

        cp, rank = dist.get_world_size(), dist.get_rank()  # the tests run cp over every process
        key = torch.cat(dnn.all_gather(key.contiguous()), dim=2)
        value = torch.cat(dnn.all_gather(value.contiguous()), dim=2)
        q_pos = head_tail_positions(rank, cp, local)
        k_pos = torch.cat([head_tail_positions(r, cp, local) for r in range(cp)])
    else:  # an ordinary call (the trainer's check of the head on four tokens)
        q_pos = k_pos = torch.arange(local)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    out = torch.softmax(scores.float(), dim=-1).to(value.dtype) @ value
    return out.transpose(1, 2).contiguous(), None


gather_attention.supports_context_parallel = True


def main() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("cp_gather", gather_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("cp_gather", sdpa_mask)

    from alphadpo_kernels.train.trainer import main as train_main

    train_main(sys.argv[1:])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
