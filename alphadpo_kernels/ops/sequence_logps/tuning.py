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
ARCH_DEFAULTS: dict[int, dict] = {
    8: dict(fwd_block_m=128, fwd_block_n=128, fwd_block_k=32, bwd_block_m=128, bwd_block_n=128, bwd_block_k=32,
            num_warps=8, num_stages=4),
    9: dict(fwd_block_m=128, fwd_block_n=128, fwd_block_k=64, bwd_block_m=128, bwd_block_n=128, bwd_block_k=64,
            num_warps=8, num_stages=4),
}
# The interpreter (CPU tensors) and unknown architectures start from the sm_80 blocks.
FALLBACK_MAJOR = 8

CANDIDATES: tuple[dict, ...] = (
    ARCH_DEFAULTS[9],
    ARCH_DEFAULTS[8],
    dict(fwd_block_m=128, fwd_block_n=128, fwd_block_k=64, bwd_block_m=128, bwd_block_n=128, bwd_block_k=64,
         num_warps=8, num_stages=3),
    dict(fwd_block_m=64, fwd_block_n=256, fwd_block_k=64, bwd_block_m=64, bwd_block_n=256, bwd_block_k=64,
         num_warps=8, num_stages=3),
    dict(fwd_block_m=64, fwd_block_n=128, fwd_block_k=64, bwd_block_m=128, bwd_block_n=128, bwd_block_k=64,
         num_warps=8, num_stages=3),
    dict(fwd_block_m=128, fwd_block_n=64, fwd_block_k=64, bwd_block_m=128, bwd_block_n=64, bwd_block_k=64,
         num_warps=4, num_stages=3),
)


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
    entry = _read(path or cache_path()).get(cache_key(device, dtype, hdim, vocab))
    if entry:
        return dict(entry["options"])
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else FALLBACK_MAJOR
    return dict(ARCH_DEFAULTS.get(major, ARCH_DEFAULTS[FALLBACK_MAJOR]))


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


def autotune(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
             candidates: Iterable[dict] = CANDIDATES, repeats: int = 5, warmup: int = 1,
             timer: Callable[[Callable[[], None]], float] | None = None, path: str | None = None,
             backend: str = "triton", write: bool = True) -> dict:
    """Time forward + backward of ``fused_sequence_logps`` for each candidate on these inputs, drop candidates
    that fail to run (e.g. too much shared memory) or disagree with the torch backend, cache the fastest.

    Returns ``{"key", "options", "ms", "results"}`` where ``results`` lists every candidate with its median
    time or the reason it was dropped.
    """
    from . import fused_sequence_logps

    timer = timer or cuda_time_ms
    check = fused_sequence_logps(hidden.detach(), weight.detach(), labels, backend="torch", check_values=False)
    results = []
    for cand in candidates:
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        try:
            opts = dataclasses.replace(LogpsOptions(), **cand)

            def step(opts=opts):
                h.grad = w.grad = None
                fused_sequence_logps(h, w, labels, backend=backend, options=opts, check_values=False).sum().backward()

            out = fused_sequence_logps(h.detach(), w.detach(), labels, backend=backend, options=opts,
                                       check_values=False)
            err = float((out - check).abs().max() / check.abs().max().clamp_min(1e-30))
            if err > 1e-3:
                results.append(dict(options=cand, error=f"disagrees with the torch backend ({err:.1e})"))
                continue
            for _ in range(warmup):
                step()
            ms = statistics.median(timer(step) for _ in range(repeats))
            results.append(dict(options=cand, ms=ms))
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is simply dropped
            results.append(dict(options=cand, error=f"{type(exc).__name__}: {str(exc)[:160]}"))
    timed = [r for r in results if "ms" in r]
    if not timed:
        raise RuntimeError(f"no candidate ran: {results}")
    best = min(timed, key=lambda r: r["ms"])
    key = cache_key(hidden.device, hidden.dtype, hidden.shape[-1], weight.shape[0])
    record = {"key": key, "options": best["options"], "ms": best["ms"], "results": results}
    if write:
        target = path or cache_path()
        data = dict(_read(target))
        data[key] = {"options": best["options"], "ms": best["ms"]}
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with open(target, "w") as f:
            json.dump(data, f, indent=1)
    return record
