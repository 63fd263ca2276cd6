"""Running statistics of the α-DPO margin ``M = Δπ − Δref`` over the whole data-parallel batch.

The released trainer gathers ``M`` from every rank, takes ``mean`` and unbiased ``std`` and folds them into
``c1, c2`` with momentum 0.9, starting from 0 with no bias correction. Here the same numbers come from two
tiny all-reduces of sufficient statistics (count and sum, then the centred sum of squares), which handles
ranks with unequal pair counts and never syncs with the host. A batch of one pair contributes std 0 (the
released code gets NaN there and keeps it forever). A batch whose gathered margins are not all finite (NaN / inf
in a live hidden state or a reference log-prob, on any rank) leaves ``c1, c2`` as they were: that step's loss is
non-finite and says so, and the statistics of every later step are those of the clean steps alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def batch_margin_stats(margins: torch.Tensor, process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of ``margins`` over every rank, as float64 0-d tensors (std unbiased, 0 for one value)."""
    x = margins.detach().double().reshape(-1)
    if _distributed(process_group):
        # torch.full, not torch.tensor: a fill kernel, where a copy from the host would synchronise the stream
        count_sum = torch.stack([torch.full((), float(x.numel()), dtype=torch.float64, device=x.device), x.sum()])
        dist.all_reduce(count_sum, group=process_group)
        n, mean = count_sum[0], count_sum[1] / count_sum[0]
        ss = ((x - mean) ** 2).sum()
        dist.all_reduce(ss, group=process_group)
    else:
        n = torch.full((), float(x.numel()), dtype=torch.float64, device=x.device)
        mean = x.mean()
        ss = ((x - mean) ** 2).sum()
    var = ss / torch.clamp(n - 1, min=1.0)
    std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
    return mean, std


def update_margin_stats(
    margin_mean: torch.Tensor,
    margin_std: torch.Tensor,
    margins: torch.Tensor,
    *,
    ema_momentum: float = 0.9,
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(c1, c2)``: ``c ← m·c + (1 − m)·batch_stat``; inputs are not modified."""
    mean, std = batch_margin_stats(margins, process_group)
    finite = torch.isfinite(mean) & torch.isfinite(std)  # a where, not an if: no host sync
    new_mean = torch.where(finite, ema_momentum * margin_mean.double() + (1.0 - ema_momentum) * mean,
                           margin_mean.double())
    new_std = torch.where(finite, ema_momentum * margin_std.double() + (1.0 - ema_momentum) * std,
                          margin_std.double())
    return new_mean.to(margin_mean.dtype), new_std.to(margin_std.dtype)
