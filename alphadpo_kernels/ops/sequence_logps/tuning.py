"""Block-size choice for the Triton kernels: per-architecture starting points, and a small autotuner that
times candidates on the real device and caches the winner per (card, H, V, dtype).

The starting points were chosen by compiling ahead of time for each architecture
(``benchmarks/compile_check.py``, no GPU needed): bf16 / fp16 use tensor cores (HMMA on sm_80, wgmma on sm_90)
with no register spills, plain and with bias + soft-cap. Their speed is not measured yet; ``autotune`` is how
they get replaced by measured choices, and ``benchmarks/gpu_check.sh`` runs it at the Llama-3 head. The cache
is a JSON file (``$ALPHADPO_TUNING_CACHE``, default ``~/.cache/alphadpo_kernels/tuning.json``). Any block field
left at None in :class:`LogpsOptions` is filled from the cache, else from the starting point
(:func:`resolve_blocks`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
from typing import Callable, Iterable

import torch

from .options import BLOCK_FIELDS, LogpsOptions

# Starting points by compute-capability major (8: A100 class, 9: H100/H200): compile-checked, speed unmeasured.
# Each kernel has its own: the forward (fwd_*) and the backward's dz producer (bwd_*).
ARCH_DEFAULTS: dict[int, dict] = {
    8: dict(fwd_block_m=128, fwd_block_n=128, fwd_block_k=32, fwd_num_warps=8, fwd_num_stages=4, fwd_group_m=8,
            bwd_block_m=128, bwd_block_n=128, bwd_block_k=32, bwd_num_warps=8, bwd_num_stages=4, bwd_group_m=8),
    9: dict(fwd_block_m=128, fwd_block_n=128, fwd_block_k=64, fwd_num_warps=8, fwd_num_stages=4, fwd_group_m=8,
            bwd_block_m=128, bwd_block_n=128, bwd_block_k=64, bwd_num_warps=8, bwd_num_stages=4, bwd_group_m=8),
}
# The interpreter (CPU tensors) and unknown architectures start from the sm_80 blocks.
FALLBACK_MAJOR = 8


def _cfg(prefix: str, m: int, n: int, k: int, warps: int, stages: int, group: int = 8) -> dict:
    return {f"{prefix}_block_m": m, f"{prefix}_block_n": n, f"{prefix}_block_k": k, f"{prefix}_num_warps": warps,
            f"{prefix}_num_stages": stages, f"{prefix}_group_m": group}


# The autotuner's candidates, per architecture and kernel: the configurations that compile without spills and
# within shared memory there (benchmarks/compile_check.py --candidates holds every one of them to that, in bf16
# and with a float32 master head), each timed on its own kernel. 128×256 tiles with 16 warps spill on sm_80.
_SHAPES = ((128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3),
           (64, 128, 64, 8, 3), (128, 128, 32, 8, 4))
_WIDE = ((128, 256, 64, 16, 3),)
CANDIDATES: dict[int, dict[str, tuple[dict, ...]]] = {
    9: {"forward": tuple(_cfg("fwd", *c) for c in _SHAPES), "backward": tuple(_cfg("bwd", *c) for c in _SHAPES + _WIDE)},
    8: {"forward": tuple(_cfg("fwd", *c) for c in _SHAPES), "backward": tuple(_cfg("bwd", *c) for c in _SHAPES)},
}
# Largest dynamic shared memory a block may opt into, by compute-capability major (CUDA programming guide).
SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}


def arch_major(device: torch.device) -> int:
    """Compute-capability major of ``device``; the interpreter and unknown cards count as sm_80."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else FALLBACK_MAJOR
    return major if major in ARCH_DEFAULTS else FALLBACK_MAJOR


def candidates_for(device: torch.device) -> dict[str, tuple[dict, ...]]:
    return CANDIDATES[arch_major(device)]


def fit_stages(stages: int, block_m: int, block_n: int, block_k: int, h_itemsize: int, w_itemsize: int,
               major: int) -> int:
    """Pipeline stages for a tile whose weight operand is wider than the hidden states' (a float32 master head is
    loaded as float32 and rounded in registers): as many of ``stages`` as keep ``stages × (h tile + w tile)``
    within the card's shared memory, at least 2. Equal widths keep ``stages`` (the configurations were
    compile-checked as they are)."""
    if w_itemsize <= h_itemsize:
        return stages
    per_stage = block_k * (block_m * h_itemsize + block_n * w_itemsize)
    return max(2, min(stages, SMEM_LIMIT.get(major, SMEM_LIMIT[FALLBACK_MAJOR]) // per_stage))


def cache_path() -> str:
    return os.environ.get("ALPHADPO_TUNING_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "alphadpo_kernels", "tuning.json"))


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cache_key(device: torch.device, dtype: torch.dtype, hdim: int, vocab: int) -> str:
    return f"{_device_name(device)}|H={hdim}|V={vocab}|{str(dtype).replace('torch.', '')}"


@functools.lru_cache(maxsize=8)
def _parse(path: str, mtime_ns: int) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _read(path: str) -> dict:
    """The cache file's contents, parsed once per modification (default_options runs on every call)."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return {}
    return _parse(path, mtime)


def default_blocks(device: torch.device, dtype: torch.dtype, hdim: int, vocab: int, path: str | None = None) -> dict:
    """A cached autotune result for this card and shape if there is one, else the architecture's start."""
    start = dict(ARCH_DEFAULTS[arch_major(device)])
    entry = _read(path or cache_path()).get(cache_key(device, dtype, hdim, vocab))
    if entry:  # fields the entry lacks (an older cache) keep the start; unknown ones are ignored
        start.update({k: v for k, v in entry["options"].items() if k in BLOCK_FIELDS})
    return start


def default_options(device: torch.device, dtype: torch.dtype, hdim: int, vocab: int,
                    path: str | None = None) -> LogpsOptions:
    return LogpsOptions(**default_blocks(device, dtype, hdim, vocab, path))


def resolve_blocks(opts: LogpsOptions, device: torch.device, dtype: torch.dtype, hdim: int, vocab: int) -> LogpsOptions:
    """``opts`` with every block field left at None taken from :func:`default_blocks`; the fields that were set
    are kept."""
    if opts.blocks_resolved:
        return opts
    fill = {k: v for k, v in default_blocks(device, dtype, hdim, vocab).items()
            if k in BLOCK_FIELDS and getattr(opts, k) is None}
    return dataclasses.replace(opts, **fill)


def cuda_time_ms(fn: Callable[[], None]) -> float:
    """Milliseconds of ``fn`` on the current CUDA stream, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _timed(fn: Callable[[], None], timer, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn) for _ in range(repeats))


def autotune(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
             candidates: dict[str, Iterable[dict]] | None = None, repeats: int = 5, warmup: int = 1,
             timer: Callable[[Callable[[], None]], float] | None = None, path: str | None = None,
             write: bool = True) -> dict:
    """Time each Triton kernel on its own for each of its candidates on these inputs, drop candidates that fail
    to run (e.g. too much shared memory) or disagree with the torch backend, cache the fastest of each.

    * ``"forward"``: the whole forward (the split-vocabulary kernel and its merge), per token ``lse`` and log-prob
      checked against the torch backend (relative 1e-3).
    * ``"backward"``: the ``dz`` producer over the backward's first vocabulary chunks at the chunk width the
      default plan uses, ``dz`` checked against the torch producer. The gradient GEMMs that follow are cuBLAS'
      and do not depend on these blocks.

    Returns ``{"key", "options", "ms": {kernel: ms}, "results": {kernel: [...]}}`` where each result lists a
    candidate with its median time or the reason it was dropped.
    """
    from . import torch_chunked, triton_forward
    from .chunked_backward import plan_backward
    from .triton_grad_logits import TritonGradLogits

    timer = timer or cuda_time_ms
    candidates = candidates or candidates_for(hidden.device)
    h2 = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()
    targets = labels.reshape(-1).long().clamp(min=-1)
    base = resolve_blocks(LogpsOptions(), h2.device, h2.dtype, h2.shape[1], w.shape[0])
    ref_logp, ref_lse = torch_chunked.forward(h2, w.to(h2.dtype), None, targets, LogpsOptions())

    # the backward's first chunk, at the width the default plan gives it
    live = (targets >= 0).nonzero().squeeze(1)
    hc, tgt, lse_c = h2[live].contiguous(), targets[live].contiguous(), ref_lse[live].contiguous()
    g = torch.full_like(lse_c, 1.0 / max(live.numel(), 1))
    probe = TritonGradLogits(w, None, base, h2.dtype)
    plan = plan_backward(live.numel(), h2.shape[0], w.shape[0], h2.shape[1], h2.dtype.itemsize,
                         probe.bytes_per_element, LogpsOptions(), True, True, False)
    vc = plan.vocab_chunk
    n_chunks = max(1, min(8, w.shape[0] // vc))
    dz_ref = torch.empty(live.numel(), vc, dtype=torch.float32, device=h2.device)
    torch_chunked.EpilogueGradLogits(w.to(h2.dtype), None, LogpsOptions(), torch_chunked.TorchEpilogue,
                                     torch.float32)(hc, tgt, lse_c, g, 0, vc, dz_ref, None, None)
    dz = torch.empty(live.numel(), vc, dtype=h2.dtype, device=h2.device)

    def rel(a, b):
        return float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30))

    results: dict[str, list] = {"forward": [], "backward": []}
    for kernel, cands in candidates.items():
        for cand in cands:
            try:
                opts = dataclasses.replace(base, **cand)
                if kernel == "forward":
                    def run(opts=opts):
                        return triton_forward.forward(h2, w, None, targets, opts)

                    logp, lse = run()
                    err = max(rel(lse[live], ref_lse[live]), rel(logp[live], ref_logp[live]))
                else:
                    producer = TritonGradLogits(w, None, opts, h2.dtype)

                    def run(producer=producer):
                        for c in range(n_chunks):
                            producer(hc, tgt, lse_c, g, c * vc, (c + 1) * vc, dz, None)

                    producer(hc, tgt, lse_c, g, 0, vc, dz, None)
                    err = rel(dz, dz_ref)
                if err > 1e-2:
                    results[kernel].append(dict(options=cand, error=f"disagrees with the torch backend ({err:.1e})"))
                    continue
                results[kernel].append(dict(options=cand, ms=_timed(run, timer, repeats, warmup)))
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is simply dropped
                results[kernel].append(dict(options=cand, error=f"{type(exc).__name__}: {str(exc)[:160]}"))
    best = {k: getattr(base, k) for k in BLOCK_FIELDS}  # the full configuration, winners over the start
    ms: dict = {}
    for kernel, rows in results.items():
        timed = [r for r in rows if "ms" in r]
        if not timed:
            raise RuntimeError(f"no {kernel} candidate ran: {rows}")
        winner = min(timed, key=lambda r: r["ms"])
        best.update(winner["options"])
        ms[kernel] = winner["ms"]
    key = cache_key(hidden.device, hidden.dtype, hidden.shape[-1], weight.shape[0])
    record = {"key": key, "options": best, "ms": ms, "results": results}
    if write:
        target = path or cache_path()
        data = dict(_read(target))
        data[key] = {"options": best, "ms": ms}
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with open(target, "w") as f:
            json.dump(data, f, indent=1)
    return record
