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
SHARDED_CALLS = [0]  # attention calls on a cp rank's share of the tokens (a run's check that cp was in force)


def head_tail_positions(rank: int, cp: int, local: int) -> torch.Tensor:
    chunk = local // 2
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                      torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)])


class _Gather(torch.autograd.Function):
    """All-gather along dim 2 over ``group``; backward: the summed gradient's slice of this rank (torch's own
    autograd all-gather addresses subgroup ranks as global ones in its backward)."""

    @staticmethod
    def forward(ctx, t, group, rank):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.size = group, rank, t.shape[2]
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, :, ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size], None, None


def gather_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``[B, Hq, T, D]`` queries against every cp rank's keys / values, causal by global position."""
    local = query.shape[2]
    if F.scaled_dot_product_attention is not _SDPA:  # inside context_parallel: this rank holds its share
        from accelerate.state import AcceleratorState

        SHARDED_CALLS[0] += 1
        mesh = AcceleratorState().device_mesh["cp"]  # the run's mesh (the trainer hands it to accelerate)
        group, cp, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        key, value = _Gather.apply(key, group, rank), _Gather.apply(value, group, rank)
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


def register_cp_gather() -> None:
    """``attn_implementation="cp_gather"`` for transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("cp_gather", gather_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("cp_gather", sdpa_mask)


def main() -> None:
    register_cp_gather()

    from alphadpo_kernels.train.trainer import main as train_main

    train_main(sys.argv[1:])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
