"""Context and tensor parallelism in ``alphadpo-train`` (``--context-parallel N``, ``--tensor-parallel N``).

The run's processes form accelerate's device mesh, ``ParallelismConfig(dp_shard_size=world / (cp · tp),
cp_size=cp, tp_size=tp)``: data parallel over ``dp_shard``, the sequence split over ``cp``, the model's weights
split over ``tp`` by its transformers ``tp_plan`` (the LM head on the vocabulary). The ranks of one cp / tp group
train on the same pairs: accelerate's data loaders hand out one batch per data-parallel rank.

Context parallel, per micro-batch (:meth:`Parallel.sharded`): the labels are shifted *before* sharding (the label
of a rank's last token may live on another rank), the sequence is padded to a multiple of ``2 · cp`` (right
padding: under causal attention a live token never attends to the pad after it, so the padding mask can be
dropped, which ring attention requires), ``position_ids`` are spelled out, and torch's ``context_parallel``
shards ``input_ids``, ``labels`` and ``position_ids`` head-tail in place and swaps SDPA for ring attention. The
fused loss then sums each sequence's log-probs over the cp group (``fused_sequence_logps(..., cp_group=)``).

Gradients: every cp rank holds the whole loss and its own tokens' share of the gradients, so the loss is
multiplied by ``cp`` before ``backward()`` and the data-parallel reduction, which *averages* over
``dp_shard × cp`` (FSDP2 over ``dp_shard_cp`` on GPUs; DDP over every process on a CPU), sums over cp and
averages over dp. Logged losses are the plain ones. α-DPO's margin statistics are gathered over the
data-parallel group only.

Where it runs: on GPUs through accelerate (FSDP2 is required under cp, as accelerate requires; ring attention
needs CUDA SDPA kernels). accelerate takes a parallelism config only on GPUs, so on a CPU this module builds the
same mesh itself and hands it to accelerate's data loaders; there the gradients are reduced by DDP, cp runs
with an attention implementation that exchanges keys and values over the cp group itself (SDPA's CPU kernels
have no ring version: torch refuses them under ``context_parallel``), and tp runs without data parallelism or cp
(DDP cannot hold DTensor weights).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ConfigError, TrainConfig, launched_plugin

# attention implementations that are right under torch's context_parallel: SDPA, whose CUDA kernels it swaps for
# ring attention; an implementation registered with transformers' AttentionInterface may declare that it exchanges
# keys and values over the cp group itself by carrying ``supports_context_parallel = True``
CP_ATTENTION = ("sdpa",)


def parallelism_config(cfg: TrainConfig, world: int):
    """accelerate's ``ParallelismConfig`` for this run, or None without cp / tp."""
    cp, tp = cfg.context_parallel, cfg.tensor_parallel
    if cp == 1 and tp == 1:
        return None
    if world % (cp * tp):
        raise ConfigError(f"--context-parallel {cp} × --tensor-parallel {tp} must divide the number of processes "
                          f"({world}); the data-parallel size is what is left")
    from accelerate.parallelism_config import ParallelismConfig

    return ParallelismConfig(dp_shard_size=world // (cp * tp), cp_size=cp, tp_size=tp)


def accelerator_kwargs(pc) -> dict:
    """What the Accelerator is built with for ``pc``. On GPUs: the parallelism config, and FSDP2 where ranks must
    reduce gradients (cp, or dp beside tp; accelerate requires it under cp) unless ``accelerate launch`` already
    asks for FSDP. On a CPU nothing: accelerate refuses parallelism configs there (see :func:`setup`)."""
    if pc is None or not torch.cuda.is_available():
        return {}
    kwargs = {"parallelism_config": pc}
    if (pc.cp_enabled or pc.dp_shard_enabled) and launched_plugin() != "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT")
    return kwargs


@dataclass
class Parallel:
    """The run's mesh and groups under cp / tp (see the module docstring)."""

    mesh: object  # torch DeviceMesh with accelerate's dimension names
    cp: int
    tp: int
    dp: int
    dp_group: object  # the data-parallel ranks (α-DPO's margin statistics); one rank when dp == 1
    cp_group: object | None
    tp_mesh: object | None
    ignore_index: int = -100

    @property
    def loss_scale(self) -> int:
        """The factor on the loss before ``backward()`` (the data-parallel reduction averages over cp too)."""
        return self.cp

    @contextlib.contextmanager
    def sharded(self, batch: dict):
        """``batch`` as this rank's share of every sequence, within torch's ``context_parallel`` (SDPA swapped for
        ring attention) for the block; the batch itself unchanged when cp is 1. Put the forward *and* the backward
        in the block."""
        if self.cp == 1:
            yield batch
            return
        out = {k: v for k, v in batch.items() if k != "attention_mask"}
        shard, enter = self.cp_shard(batch["input_ids"], batch["labels"])
        out.update(shard)
        with enter():
            yield out

    def cp_shard(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """``(inputs, enter)``: :func:`cp_inputs` of a right-padded batch plus an all-ones ``attention_mask``, and
        ``enter()``, the context manager (torch's ``context_parallel`` over the cp mesh) inside which those tensors
        are this rank's share, in place. The all-ones mask, not none: transformers then runs SDPA causal without a
        mask (what ring attention takes), where ``position_ids`` without a mask would read the head-tail jump as
        packed sequences and build a ``[T_local, T_local]`` mask. Collective: the cp ranks first check that they hold
        the same rows (:meth:`check_same_rows`)."""
        from torch.distributed.tensor.experimental import context_parallel

        self.check_same_rows(input_ids)
        out = cp_inputs(input_ids, labels, self.cp, self.ignore_index)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        buffers = list(out.values())
        enter = functools.partial(context_parallel, self.mesh["cp"], buffers=buffers,
                                  buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers))
        return out, enter

    def batches(self, loader):
        """``loader``'s batches, each yielded inside :meth:`sharded` (for passes that run nothing else meanwhile:
        the reference precompute, evaluation)."""
        for batch in loader:
            with self.sharded(batch) as shard:
                yield shard

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` of every data-parallel rank, concatenated on dim 0 (the cp / tp ranks of a group hold the same
        pairs: gathering them too would repeat every pair)."""
        import torch.distributed as dist

        t = t.reshape(1) if t.dim() == 0 else t.contiguous()
        if self.dp == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.dp)]
        dist.all_gather(parts, t, group=self.dp_group)
        return torch.cat(parts)

    def gather_for_metrics(self, accelerator, data, use_gather_object: bool = False):
        """``accelerator.gather_for_metrics`` over the data-parallel ranks only: :meth:`gather` of every tensor in
        ``data`` (nested lists / tuples / dicts; other objects with ``torch.distributed.all_gather_object``), less
        the padding accelerate's data loaders add to the last batch (``even_batches``), as accelerate drops it."""
        import torch.distributed as dist
        from accelerate.utils import recursively_apply

        state = accelerator.gradient_state
        cut = state.end_of_dataloader and state.remainder > 0

        def tensor(t):
            out = self.gather(t)
            return out[: state.remainder] if cut else out

        if not use_gather_object and _all_tensors(data):
            return recursively_apply(tensor, data)
        parts = [None] * self.dp
        dist.all_gather_object(parts, data, group=self.dp_group)
        out = [x for part in parts for x in (part if isinstance(part, (list, tuple)) else [part])]
        return out[: state.remainder] if cut else out

    def check_same_rows(self, input_ids: torch.Tensor) -> None:
        """Raise, on every rank of the cp group alike, unless they all hold the same batch: ring attention over
        different rows would mix sequences. accelerate's data loaders give a cp group the same rows; a dispatching
        loader (``dispatch_batches``, iterable data sets) splits over every process instead. One all-gather of
        three integers."""
        import torch.distributed as dist

        rows, width = input_ids.shape
        weights = torch.arange(1, width + 1, device=input_ids.device, dtype=torch.long)
        probe = torch.stack([torch.tensor(rows, device=input_ids.device), torch.tensor(width, device=input_ids.device),
                             (input_ids.long() * weights).sum()]).long()
        parts = [torch.empty_like(probe) for _ in range(self.cp)]
        dist.all_gather(parts, probe, group=self.cp_group)
        if any(not torch.equal(part, parts[0]) for part in parts[1:]):
            raise ValueError("context parallelism: the ranks of one cp group received different batches (their rows "
                             "would be mixed by ring attention); use accelerate's default data loaders, without "
                             "dispatch_batches, and map-style data sets")


def _all_tensors(data) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, (list, tuple)):
        return all(_all_tensors(x) for x in data)
    if isinstance(data, dict):
        return all(_all_tensors(x) for x in data.values())
    return False


def cp_inputs(input_ids: torch.Tensor, labels: torch.Tensor, cp: int, ignore_index: int = -100) -> dict:
    """Right-padded ``[rows, T]`` inputs made ready for sharding over ``cp`` ranks: labels shifted (``labels[:, t]``
    is the token after position ``t``; ``ignore_index`` after the last), ``T`` padded to a multiple of ``2 · cp``
    (torch's head-tail layout), ``position_ids`` ``0..T-1``, each a tensor of its own (sharding is in place)."""
    rows, width = input_ids.shape
    padded = -(-width // (2 * cp)) * 2 * cp
    pad = padded - width
    shifted = F.pad(labels[:, 1:], (0, 1 + pad), value=ignore_index)
    ids = F.pad(input_ids, (0, pad), value=0)  # any id: no live position attends to the padding (causal)
    positions = torch.arange(padded, device=input_ids.device).expand(rows, padded).clone()
    return {"input_ids": ids.contiguous(), "labels": shifted.contiguous(), "position_ids": positions}


def one_rank_groups():
    """This rank's group of one rank (collective: every rank calls it, once)."""
    import torch.distributed as dist

    group, _ = dist.new_subgroups(group_size=1)
    return group


def setup(accelerator, pc) -> Parallel | None:
    """The run's :class:`Parallel` from accelerate's mesh (GPUs) or the same mesh built here (CPU); collective."""
    if pc is None:
        return None
    mesh = accelerator.torch_device_mesh
    if mesh is None:  # a CPU: accelerate refuses parallelism configs off GPUs
        if pc.tp_enabled and pc.total_size != pc.tp_size:
            raise ConfigError("on a CPU, --tensor-parallel runs only over every process (no data or context "
                              "parallelism beside it: DDP cannot hold DTensor weights); on GPUs FSDP2 composes them")
        mesh = pc.build_device_mesh("cpu")
        accelerator.state.device_mesh = mesh  # accelerate's data loaders: one batch per data-parallel rank
    dp = pc.dp_replicate_size * pc.dp_shard_size
    dp_group = mesh["dp"].get_group() if pc.dp_dim_names else one_rank_groups()
    return Parallel(mesh=mesh, cp=pc.cp_size, tp=pc.tp_size, dp=dp, dp_group=dp_group,
                    cp_group=mesh["cp"].get_group() if pc.cp_enabled else None,
                    tp_mesh=mesh["tp"] if pc.tp_enabled else None)


def check_attention(model, cp: int, what: str = "--context-parallel") -> None:
    """Refuse, under cp, a model whose layers sharding cannot express (transformers' ``supports_context_parallel``)
    and an attention implementation that would silently attend within each rank's tokens only."""
    if cp == 1:
        return
    if getattr(model, "supports_context_parallel", True) is False:  # transformers' own verdict on the layers
        raise ConfigError(f"{what}: {type(model).__name__} does not support context parallelism (sliding-window or "
                          "chunked attention layers, or a recurrent state along the sequence, which sharding would "
                          "silently turn into full causal attention or cut at each rank's share)")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in CP_ATTENTION:
        return
    from transformers import AttentionInterface

    fn = AttentionInterface._global_mapping.get(impl)
    if fn is None or not getattr(fn, "supports_context_parallel", False):
        raise ConfigError(f"{what} needs attn_implementation sdpa (ring attention, CUDA); the model uses "
                          f"{impl!r}, which would attend within each rank's share of the sequence only")
