"""Fused α-DPO loss vs the naive full-logits path (and Liger-Kernel, Cut Cross-Entropy, TRL): time and memory.

    python benchmarks/bench_loss.py                        # small CPU shapes without a GPU; Llama-3-8B head on a GPU
    python benchmarks/bench_loss.py --json out.json --plot out.png --jsonl rows.jsonl
    python benchmarks/bench_loss.py --T 1024 4096 --methods fused fused-lean naive --regimes peaked

Every method computes the same α-DPO loss forward + backward with reference log-probs given, except
``liger`` (Liger-Kernel's fused linear SimPO: it has no α-DPO); the methods are listed at the end of --help.
Each row reports the median time of the timed runs and their spread (max / min), the peak memory above the
inputs, and the time of one plain ``h·Wᵀ`` GEMM of the same shape measured in the same run, so that
``time / GEMM`` carries across cards; the memory floor is the size of the gradients dH + dW.

Nothing is written to disk unless asked: ``--json FILE`` (every row, at the end), ``--plot FILE.png`` (memory
and time against T) and ``--jsonl FILE`` (each row appended as soon as it is measured, so a run cut short keeps
what it measured); ``benchmarks/render_results.py`` turns either file into Markdown. The last lines of a run say
where its results went, or how to keep them.

On a GPU the timings are CUDA events after warm-up and memory is the caching allocator's peak. On the CPU
every row runs in a fresh process (glibc told to unmap large blocks on free), timed by wall clock, and its
memory is the rise of the resident-set high-water mark over the resident set after a warm-up, so one
method's memory cannot hide another's. Wall-clock timings on a shared machine can swing several-fold: a row
whose timed runs differ by more than SPREAD_WARN (1.5×, max / min) is marked ``!`` and the run ends with a
warning; its median is not to be trusted (rerun on an idle machine, or with more --repeats). The threshold is
loose on purpose: on an idle machine repeated runs of these shapes stay within a few percent of each other,
while a busy neighbour costs 2–10×.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from alphadpo_kernels import LogpsOptions, fused_alpha_dpo_loss, reference_sequence_logps  # noqa: E402
from alphadpo_kernels.losses import alpha_dpo_head, simpo_head  # noqa: E402
from alphadpo_kernels.ops.sequence_logps.tuning import cuda_time_ms  # noqa: E402

METHODS = ("fused", "fused-lean", "cublas", "naive", "liger", "cce", "trl", "fused-filter", "fused-packed",
           "fused-torch", "fused-torch-packed", "fused-torch-noext")
FUSED = {"fused": "triton", "fused-lean": "triton", "fused-filter": "triton", "fused-packed": "triton",
         "cublas": "cublas", "fused-torch": "torch", "fused-torch-packed": "torch", "fused-torch-noext": "torch"}
REGIMES = ("uniform", "peaked", "ragged")
DEFAULT_REGIMES = ("uniform", "peaked")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_DEFAULTS = dict(T=[1024, 4096, 16384, 32768], H=4096, V=128256, dtype="bf16")
# The CPU head is 1/16 of Llama-3's in H and V; the fused paths' scratch budget is scaled from 64 MB to 4 MB with
# it, or at these sizes one call's whole logits would fit in the budget and memory would look T-dependent.
CPU_DEFAULTS = dict(T=[64, 128, 256], H=256, V=8192, dtype="fp32", budget_mb=4.0)
# Pairs per T on the GPU, so that the smallest sizes fill the card (4×2×1024, 2×2×4096, 1×2×32768 tokens).
GPU_PAIRS = {1024: 4, 4096: 2, 16384: 1, 32768: 1}
HPARAMS = dict(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2)
TARGET_ENTROPY = 3.0  # nats: a trained LM's mean next-token entropy is 2–4
SPREAD_WARN = 1.5  # max / min of a row's timed runs above which its median is flagged as unreliable

METHOD_HELP = {
    "fused": "this package, Triton backend, memory='fast' (CUDA)",
    "fused-lean": "this package, Triton backend, memory='lean': two backward passes, no float32 gradient buffer "
                  "(CUDA)",
    "cublas": "this package, cuBLAS float32 logit chunks + the compiled CUDA epilogue (CUDA, needs _C_cuda)",
    "naive": "full logits [N, V] in the input dtype, log-softmax, gather, autograd: the baseline",
    "liger": "Liger-Kernel's LigerFusedLinearSimPOLoss (SimPO: it has no α-DPO; checked against naive SimPO)",
    "cce": "Cut Cross-Entropy's linear_cross_entropy per token, then the same α-DPO head",
    "trl": "TRL >= 1.15's ChunkedLogProbFunction (DPOTrainer's fused LM head), length-normalised, same head",
    "fused-filter": "fused with opt-in backward tile skipping, LogpsOptions(filter_eps='auto') (CUDA)",
    "fused-packed": "fused on padding-free (packed) rows with cu_seqlens (CUDA; the ragged regime shows it)",
    "fused-torch": "this package, torch backend (any device; the compiled CPU epilogue when built)",
    "fused-torch-packed": "fused-torch on padding-free (packed) rows with cu_seqlens",
    "fused-torch-noext": "fused-torch with the compiled CPU epilogue switched off, to show what it buys",
}


@dataclass
class Case:
    method: str
    regime: str
    T: int
    pairs: int
    H: int
    V: int
    dtype: str
    device: str
    repeats: int = 5
    warmup: int = 2
    check: bool = False  # compare loss and gradients with `naive` (done at the smallest T)
    seed: int = 0
    budget_mb: float | None = None  # LogpsOptions.memory_budget_mb of the fused paths (None: the library default)

    @property
    def N(self) -> int:
        return self.pairs * 2 * self.T


@dataclass
class Row:
    method: str
    regime: str
    T: int
    N: int
    H: int
    V: int
    dtype: str
    device: str
    pairs: int
    ms: float | None = None  # median of the timed runs
    ms_min: float | None = None
    ms_max: float | None = None
    spread: float | None = None  # ms_max / ms_min
    gemm_ms: float | None = None
    time_vs_gemm: float | None = None
    peak_mem_mb: float | None = None
    floor_mb: float = 0.0
    peak_vs_floor: float | None = None
    entropy: float | None = None
    loss_rel_diff: float | None = None
    grad_rel_diff: float | None = None
    status: str = "ok"  # ok | skipped | OOM | error
    reason: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- inputs


def make_inputs(case: Case):
    """Hidden ``[2P, T, H]``, head ``[V, H]``, labels ``[2P, T]`` and fixed reference log-probs.

    ``uniform``: random hidden states and head, uniform labels: a near-uniform softmax, the worst case for
    skipping tiles. ``ragged``: as uniform, but each response has its own length drawn from a long-tailed
    distribution up to T (median ≈ T/5; lognormal) and the first tenth of it is prompt; the rest of the row is
    padding, which a padding-free (packed) batch leaves out. ``peaked``: built like a trained LM's output. The head carries a Zipf log-frequency prior
    along one hidden direction (logit ``−1.2·log(rank + 1)``: frequent ids on top, the rare tail many nats
    down), labels are Zipf-distributed, and each hidden state is pulled towards its label's head row, the
    pull scaled so that the mean token entropy is ``TARGET_ENTROPY`` (3 nats; measured and printed).
    """
    dev, dt = torch.device(case.device), DTYPES[case.dtype]
    gen = torch.Generator(device=dev).manual_seed(case.seed)
    rows = 2 * case.pairs
    weight = torch.randn(case.V, case.H, generator=gen, device=dev) * (case.H ** -0.5)
    if case.regime in ("uniform", "ragged"):
        labels = torch.randint(0, case.V, (rows, case.T), generator=gen, device=dev)
        hidden = torch.randn(rows, case.T, case.H, generator=gen, device=dev)
        if case.regime == "ragged":
            lengths = ragged_lengths(rows, case.T, gen, dev)
            pos = torch.arange(case.T, device=dev)[None, :]
            prompt = (lengths.float() * 0.1).ceil().long()[:, None]
            labels = labels.masked_fill((pos >= lengths[:, None]) | (pos < prompt), -100)
    else:
        log_freq = -torch.log(torch.arange(case.V, device=dev, dtype=torch.float32) + 1.0)
        labels = torch.multinomial(log_freq.exp(), rows * case.T, replacement=True, generator=gen).view(rows, case.T)
        u = torch.randn(case.H, generator=gen, device=dev)
        u /= u.norm()
        weight -= (weight @ u)[:, None] * u[None, :]
        weight += log_freq[:, None] * u[None, :]
        free = PULL * weight[labels] + torch.randn(rows, case.T, case.H, generator=gen, device=dev)
        free -= (free @ u)[..., None] * u
        scale = _calibrate(lambda c: u * PRIOR_SLOPE + free.reshape(-1, case.H)[_sample(rows * case.T, dev)] * c,
                           weight)
        hidden = free.mul_(scale).add_(u * PRIOR_SLOPE)
    ref = -1.5 - torch.rand(rows, generator=gen, device=dev)
    return hidden.to(dt), weight.to(dt), labels, ref[: case.pairs], ref[case.pairs:]


def ragged_lengths(rows: int, T: int, gen, device) -> torch.Tensor:
    """Long-tailed response lengths in [max(4, T/16), T]: lognormal, median ≈ T/5."""
    x = torch.exp(torch.randn(rows, generator=gen, device=device) - 1.6)
    return (x * T).round().long().clamp(max(4, T // 16), T)


def pack_rows(hidden: torch.Tensor, labels: torch.Tensor):
    """Padding-free layout of padded rows: each row up to its last live label, concatenated; ``keep`` marks the
    padded positions that were kept."""
    pos = torch.arange(labels.shape[1], device=labels.device)[None, :]
    last = torch.where(labels != -100, pos, -1).amax(1)
    keep = pos <= last[:, None]
    lengths = keep.sum(1)
    cu = torch.zeros(labels.shape[0] + 1, dtype=torch.int32, device=labels.device)
    cu[1:] = lengths.cumsum(0)
    return hidden[keep].contiguous(), labels[keep], cu, keep


PULL = 6.0  # how far each hidden state leans towards its label's head row, in units of the noise
PRIOR_SLOPE = 1.2  # logit = −PRIOR_SLOPE·log(rank + 1) from the frequency prior


def _sample(n, device, k=256):
    return torch.linspace(0, n - 1, min(k, n), device=device).long()


def _entropy(hidden_sample, weight):
    logp = (hidden_sample.float() @ weight.float().T).log_softmax(-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def _calibrate(make, weight, target=TARGET_ENTROPY):
    """Bisection on the pull's scale for the target mean entropy (on a token sample)."""
    lo, hi = 1e-3, 1e2
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if _entropy(make(mid), weight) > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def token_entropy(hidden, weight) -> float:
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _entropy(flat[_sample(flat.shape[0], flat.device)], weight)


# ----------------------------------------------------------------------------------------------- methods


def _naive_logps(hidden, weight, labels):
    """The released trainer's path: full logits in the model's dtype, float32 log_softmax, gather, mean."""
    return reference_sequence_logps(hidden, weight, labels, compute_dtype=None)


def _alpha_dpo(logps, ref_c, ref_r, pairs):
    zeros = torch.zeros(1, device=logps.device)
    head = alpha_dpo_head(logps[:pairs], logps[pairs:], ref_c, ref_r, margin_mean=zeros + 0.1,
                          margin_std=zeros + 0.5, **HPARAMS)
    return head.losses.mean()


def method_fn(method: str, budget_mb: float | None = None) -> Callable:
    """``fn(hidden, weight, labels, ref_c, ref_r) -> loss`` for a method, or raises ImportError / RuntimeError."""
    if method in FUSED:
        backend = FUSED[method]
        # fused-filter: backward tile skipping at the dtype's threshold (opt-in; `fused` is exact);
        # fused-torch-noext: the torch backend without the compiled CPU epilogue, to show what it buys
        options = LogpsOptions(memory="lean" if method == "fused-lean" else "fast", memory_budget_mb=budget_mb,
                               filter_eps="auto" if method == "fused-filter" else None,
                               use_extension=method != "fused-torch-noext")

        layout: dict = {}

        def run(hidden, weight, labels, ref_c, ref_r):
            return fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                        margin_mean=torch.tensor([0.1], device=hidden.device),
                                        margin_std=torch.tensor([0.5], device=hidden.device),
                                        backend=backend, check_values=False, options=options,
                                        cu_seqlens=layout.get("cu"), **HPARAMS).loss

        if method.endswith("-packed"):  # a padding-free batch: the decoder hands over the packed tokens only
            def prepare(hidden, labels):
                packed_hidden, packed_labels, layout["cu"], layout["keep"] = pack_rows(hidden, labels)
                return packed_hidden, packed_labels
            run.prepare, run.layout = prepare, layout
        return run
    if method == "naive":
        return lambda h, w, y, rc, rr: _alpha_dpo(_naive_logps(h, w, y), rc, rr, h.shape[0] // 2)
    if method == "liger":
        mod = importlib.import_module("liger_kernel.chunked_loss")
        gamma = HPARAMS["beta"] * HPARAMS["gamma_beta_ratio"]
        loss_fn = mod.LigerFusedLinearSimPOLoss(beta=HPARAMS["beta"], gamma=gamma, compute_nll_loss=False)

        def run(hidden, weight, labels, ref_c, ref_r):
            out = loss_fn(weight, hidden, labels)
            return out[0] if isinstance(out, tuple) else out
        return run
    if method == "cce":
        linear_cross_entropy = importlib.import_module("cut_cross_entropy").linear_cross_entropy

        def run(hidden, weight, labels, ref_c, ref_r):
            nll = linear_cross_entropy(hidden, weight, labels, reduction="none")
            return _alpha_dpo(-nll.float().mean(-1), ref_c, ref_r, hidden.shape[0] // 2)
        return run
    if method == "trl":
        return _trl_method()
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _trl_method() -> Callable:
    """TRL ≥ 1.15's fused LM head as DPOTrainer calls it (trl.trainer.utils): live positions only, its vocabulary
    chunk width, log-probs alone requested; then length-normalised and the same α-DPO head."""
    import inspect

    chunked = importlib.import_module("trl.kernels.chunked_logprob").ChunkedLogProbFunction
    try:
        chunk = importlib.import_module("trl.trainer.utils")._CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError:
        # trl.trainer.utils needs TRL's data stack (pandas, datasets + pyarrow: 70 MB), which a minimal benchmark
        # environment may lack. The kernel's backward takes one thing from it, maybe_gather_lm_head_ctx, a null context
        # unless DeepSpeed ZeRO-3 partitions the head: on one GPU a stub is exactly what TRL would do.
        import contextlib
        import types

        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        stub._CHUNKED_LOGPROB_CHUNK_SIZE = chunk = 32768  # DPOTrainer's vocabulary chunk in trl 1.15-1.16
        sys.modules["trl.trainer.utils"] = stub
    params = list(inspect.signature(chunked.forward).parameters)[1:]  # the releases differ in their tail
    tail = {"temperature": 1.0, "chunk_size": chunk, "final_logit_softcapping": None, "logit_scale": 1.0,
            "outputs": ()}

    def run(hidden, weight, labels, ref_c, ref_r):
        live = labels != -100
        head = {"hidden": hidden[live], "weight": weight, "bias": None, "targets": labels[live]}
        token_logps = chunked.apply(*({**head, **tail}[name] for name in params))[0]
        token_logps = hidden.new_zeros(labels.shape, dtype=token_logps.dtype).masked_scatter(live, token_logps)
        return _alpha_dpo(token_logps.sum(-1) / live.sum(-1), ref_c, ref_r, hidden.shape[0] // 2)
    return run


def unavailable_reason(method: str, device: str) -> str:
    """Why a method cannot run here ('' when it can)."""
    if method in ("fused", "fused-lean", "fused-filter", "fused-packed") and device != "cuda":
        return "Triton kernels need a CUDA device (the CPU interpreter is for tests, not timing)"
    if method == "cublas":
        if device != "cuda":
            return "the cublas backend needs a CUDA device"
        from alphadpo_kernels import _extension

        return "" if _extension.cuda_module() is not None else "CUDA extension (alphadpo_kernels._C_cuda) not built"
    if method == "fused-torch-noext":
        from alphadpo_kernels import _extension

        return "" if _extension.cpu_module() is not None else "no compiled CPU epilogue to compare against"
    if method == "liger":
        if device != "cuda":
            return "Liger-Kernel needs a CUDA device"
        return "" if importlib.util.find_spec("liger_kernel") else "liger-kernel not installed"
    if method == "cce":
        if device != "cuda":
            return "Cut Cross-Entropy needs a CUDA device"
        return "" if importlib.util.find_spec("cut_cross_entropy") else "cut-cross-entropy not installed"
    if method == "trl":  # on the CPU, TRL folds its tiles with torch ops instead of Triton
        try:
            found = importlib.util.find_spec("trl.kernels.chunked_logprob") is not None
        except ModuleNotFoundError:
            found = False
        return "" if found else "trl >= 1.15 (trl.kernels.chunked_logprob) not installed"
    return ""


def reference_method(method: str) -> Callable:
    """What a method's result is checked against: naive α-DPO, or naive SimPO for Liger."""
    if method != "liger":
        return method_fn("naive")

    def run(hidden, weight, labels, ref_c, ref_r):
        logps = _naive_logps(hidden, weight, labels)
        p = hidden.shape[0] // 2
        return simpo_head(logps[:p], logps[p:], beta=HPARAMS["beta"],
                          gamma_beta_ratio=HPARAMS["gamma_beta_ratio"]).losses.mean()
    return run


# ----------------------------------------------------------------------------------------------- measuring


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


class _Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable) -> float:
        if self.cuda:
            return cuda_time_ms(fn)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1)) * 1024


@contextlib.contextmanager
def _peak_memory(device: str, out: dict):
    """Peak bytes allocated inside the block above what was allocated on entry."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset the resident-set high-water mark
            f.write("5")
        yield
        out["peak"] = max(0, _proc_status("VmHWM") - base)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure(case: Case, fn: Callable | None = None) -> Row:
    """Run one row in this process (the caller decides about process isolation)."""
    row = Row(case.method, case.regime, case.T, case.N, case.H, case.V, case.dtype, case.device, case.pairs)
    esize = DTYPES[case.dtype].itemsize
    row.floor_mb = (case.N * case.H + case.V * case.H) * esize / 2**20
    reason = unavailable_reason(case.method, case.device) if fn is None else ""
    if reason:
        row.status, row.reason = "skipped", reason
        return row
    try:
        fn = fn or method_fn(case.method, case.budget_mb)
    except ImportError as exc:
        row.status, row.reason = "skipped", f"not importable: {exc}"
        return row
    timer = _Timer(case.device)
    try:
        hidden, weight, labels, ref_c, ref_r = make_inputs(case)
        row.entropy = token_entropy(hidden, weight)
        padded = (hidden, labels)
        if hasattr(fn, "prepare"):
            hidden, labels = fn.prepare(hidden, labels)
        tokens = hidden.numel() // case.H
        row.extra["decoder_tokens"] = tokens  # what the decoder would have run: padded rows, or packed tokens
        row.extra["live_tokens"] = int((labels != -100).sum())
        row.floor_mb = (tokens * case.H + case.V * case.H) * esize / 2**20
        hidden.requires_grad_(True)
        weight.requires_grad_(True)

        def step():
            hidden.grad = weight.grad = None
            fn(hidden, weight, labels, ref_c, ref_r).backward()

        def gemm():
            hidden.detach().reshape(-1, case.H) @ weight.detach().T

        for _ in range(case.warmup):
            gemm()
            step()
        hidden.grad = weight.grad = None
        mem: dict = {}
        with _peak_memory(case.device, mem):
            times = [timer(step) for _ in range(case.repeats)]
        row.ms, row.ms_min, row.ms_max = statistics.median(times), min(times), max(times)
        row.spread = row.ms_max / row.ms_min if row.ms_min > 0 else None
        row.peak_mem_mb = mem["peak"] / 2**20
        hidden.grad = weight.grad = None
        row.gemm_ms = statistics.median(timer(gemm) for _ in range(case.repeats))
        row.time_vs_gemm = row.ms / row.gemm_ms
        row.peak_vs_floor = row.peak_mem_mb / row.floor_mb
        if case.check:
            row.loss_rel_diff, row.grad_rel_diff = _check(case, fn, hidden, weight, labels, ref_c, ref_r, padded)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row, and the run goes on
        row.status = "OOM" if is_oom(exc) else "error"
        row.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        row.ms = row.ms_min = row.ms_max = row.spread = row.peak_mem_mb = None
    finally:
        if case.device == "cuda":
            torch.cuda.empty_cache()
    return row


def _check(case, fn, hidden, weight, labels, ref_c, ref_r, padded):
    results = []
    runs = [(fn, hidden, labels), (reference_method(case.method), padded[0].detach().requires_grad_(), padded[1])]
    for f, h, y in runs:
        h.grad = weight.grad = None
        loss = f(h, weight, y, ref_c, ref_r)
        loss.backward()
        results.append((loss.detach(), h.grad.clone(), weight.grad.clone()))
    hidden.grad = weight.grad = None
    (l1, h1, w1), (l0, h0, w0) = results
    if hasattr(fn, "layout"):  # packed: compare with the padded gradient at the kept positions
        h0 = h0[fn.layout["keep"]]
    return _rel(l1, l0), max(_rel(h1, h0), _rel(w1, w0))


def measure_isolated(case: Case) -> Row:
    """CPU: one fresh process per row, so that allocator state and peaks never leak between methods."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(asdict(case))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("ROW "):
            return Row(**json.loads(line[4:]))
    row = Row(case.method, case.regime, case.T, case.N, case.H, case.V, case.dtype, case.device, case.pairs)
    row.status = "OOM" if proc.returncode in (-9, 137) else "error"
    row.reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
    return row


# ----------------------------------------------------------------------------------------------- output


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


COLUMNS = {
    "regime": "uniform: near-uniform softmax (random head); peaked: a trained LM's (Zipf prior, ~3 nats); "
              "ragged: long-tailed response lengths (padded vs packed)",
    "T": "tokens per response (row length)",
    "N": "tokens in the step: pairs × 2 × T (the padded rows)",
    "decoder tok": "tokens a decoder would have run for the batch: N, or only the packed ones (fused-*-packed)",
    "ms": "median wall time of forward + backward of the whole α-DPO loss (CUDA events on a GPU)",
    "min–max": "fastest and slowest of the timed runs (--repeats)",
    "spread": f"max / min of the timed runs; '!' above {SPREAD_WARN}×: the median is unreliable",
    "×GEMM": "ms / one plain h·Wᵀ GEMM over the tokens the call receives, timed in the same run",
    "peak MB": "peak memory allocated during the step above what the inputs already held",
    "×floor": "peak MB / the gradients themselves (dH + dW), the least any method must hold",
    "loss Δ / grad Δ": "max relative difference of the loss / gradients from naive (Liger: from naive SimPO), "
                       "checked at the smallest T only; blank elsewhere",
    "status": "ok, or OOM / error with the reason (methods that cannot run here are listed below the table)",
}


def unsteady(row: Row) -> bool:
    """A measured row whose timed runs differ by more than SPREAD_WARN (max / min)."""
    return row.status == "ok" and row.spread is not None and row.spread > SPREAD_WARN


def print_table(rows: list[Row], title: str) -> None:
    """The rows that ran (or failed) as a table; a method that cannot run here is one line below it, with why."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220)
    table = Table(title=title, show_lines=False)
    for col in ("regime", "T", "N", "method", "decoder tok", "ms", "min–max", "spread", "×GEMM", "peak MB",
                "×floor", "loss Δ", "grad Δ", "status"):
        table.add_column(col, justify="left" if col in ("regime", "method", "status") else "right")

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for r in rows:
        if r.status == "skipped":
            continue
        span = f"{r.ms_min:.1f}–{r.ms_max:.1f}" if r.ms_min is not None else ""
        spread = f(r.spread, ".2f") + (" !" if unsteady(r) else "")
        table.add_row(r.regime, str(r.T), str(r.N), r.method, str(r.extra.get("decoder_tokens", "")),
                      f(r.ms, ".1f"), span, spread, f(r.time_vs_gemm, ".2f"),
                      f(r.peak_mem_mb, ".1f"), f(r.peak_vs_floor, ".2f"), f(r.loss_rel_diff, ".1e"),
                      f(r.grad_rel_diff, ".1e"), r.status if r.status == "ok" else f"{r.status}: {r.reason}")
    console.print(table)
    skipped: dict[str, str] = {}
    for r in rows:
        if r.status == "skipped":
            skipped.setdefault(r.method, r.reason)
    for method, reason in skipped.items():
        console.print(f"not run here: {method}: {reason}", highlight=False)
    for col, meaning in COLUMNS.items():
        console.print(f"  {col}: {meaning}", highlight=False)


def count_rows(rows: list[Row]) -> dict[str, int]:
    """Rows by outcome: measured (ok), failed (OOM / error) and skipped (the method cannot run here)."""
    return {"measured": sum(r.status == "ok" for r in rows),
            "failed": sum(r.status in ("OOM", "error") for r in rows),
            "skipped": sum(r.status == "skipped" for r in rows)}


def summary_lines(rows: list[Row], seconds: float, repeats: int, saved: dict[str, str]) -> list[str]:
    """The run's closing lines: what was measured, how steady the timings were, and where the results went."""
    n = count_rows(rows)
    lines = [f"{n['measured']} rows measured, {n['failed']} failed, {n['skipped']} skipped (method cannot run here) "
             f"in {seconds:.0f} s"]
    ok = [r for r in rows if r.status == "ok" and r.spread is not None]
    if repeats < 2:
        lines.append("timing spread unknown: one timed run per row (--repeats 1)")
    elif ok:
        spreads = sorted(r.spread for r in ok)
        lines.append(f"timing spread (max / min of {repeats} runs per row): {spreads[0]:.2f}–{spreads[-1]:.2f}×, "
                     f"median {statistics.median(spreads):.2f}×")
        bad = [r for r in ok if unsteady(r)]
        if bad:
            lines.append(f"warning: {len(bad)} of {len(ok)} measured rows swing more than {SPREAD_WARN}× between "
                         "timed runs (marked !): the machine is busy or the rows are too short, so their medians "
                         "are unreliable; rerun on an idle machine or with more --repeats")
    if saved:
        lines += [f"{what} written to {path}" for what, path in saved.items()]
    else:
        lines.append("results not saved: add --json FILE (all rows), --jsonl FILE (each row as measured) or "
                     "--plot FILE.png; benchmarks/render_results.py FILE makes a Markdown table of them")
    return lines


def plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"uniform": "-", "peaked": "--", "ragged": ":"}
    for (ax, key, label) in ((axes[0], "peak_mem_mb", "peak memory above inputs (MB)"), (axes[1], "ms", "fwd+bwd time (ms)")):
        for method in METHODS:
            for regime in REGIMES:
                pts = sorted((r.T, getattr(r, key)) for r in rows
                             if r.method == method and r.regime == regime and r.status == "ok")
                if pts:
                    ax.plot(*zip(*pts), styles[regime], marker="o", label=f"{method} ({regime})")
        if key == "peak_mem_mb":
            floor = sorted({(r.T, r.floor_mb) for r in rows})
            if floor:
                ax.plot(*zip(*floor), ":", color="black", label="floor (dH + dW)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per response (T)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------- driver


def build_cases(args) -> list[Case]:
    on_gpu = args.device == "cuda"
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    ts = args.T or defaults["T"]
    cases = []
    for regime in args.regimes:
        for t in ts:
            pairs = args.pairs or (GPU_PAIRS.get(t, max(1, 8192 // (2 * t))) if on_gpu else 2)
            for method in args.methods:
                cases.append(Case(method, regime, t, pairs, args.H or defaults["H"], args.V or defaults["V"],
                                  args.dtype or defaults["dtype"], args.device, args.repeats, args.warmup,
                                  check=(t == min(ts)) and method != "naive", seed=args.seed,
                                  budget_mb=args.budget_mb or defaults.get("budget_mb")))
    return cases


def run_cases(cases: list[Case], isolate: bool, progress: bool = True,
              on_row: Callable[[Row], None] | None = None) -> list[Row]:
    rows = []
    runner = measure_isolated if isolate else measure

    def run(case):
        row = runner(case)
        rows.append(row)
        if on_row is not None:
            on_row(row)

    if not progress:
        for case in cases:
            run(case)
        return rows
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("benchmark", total=len(cases))
        for case in cases:
            bar.update(task, description=f"{case.method:11s} {case.regime:7s} T={case.T}")
            run(case)
            bar.advance(task)
    return rows


def performance_targets(rows: list[Row]) -> list[tuple[str, str, bool | None]]:
    """The performance targets of docs/design.md, read off the rows that measure them: ``(target, measured,
    met)``; ``met`` is None when a row it needs is missing."""
    ok = {(r.method, r.regime, r.N): r for r in rows if r.status == "ok"}
    out = []
    for n in sorted({r.N for r in rows}):
        f, lean, naive, cce, trl = (ok.get((m, "uniform", n)) for m in ("fused", "fused-lean", "naive", "cce", "trl"))
        if f is None:
            continue
        extra = 4 * min(n, f.V) * f.H / 2**20 + 64  # MB
        out.append((f"N={n}: fast memory ≤ floor + 4·min(N,V)·H + 64 MB",
                    f"{f.peak_mem_mb:.0f} ≤ {f.floor_mb + extra:.0f} MB", f.peak_mem_mb <= f.floor_mb + extra))
        if n == 16384:
            out.append(("N=16k: fast ≤ 4.4 GEMM units", f"{f.time_vs_gemm:.2f}", f.time_vs_gemm <= 4.4))
        if naive is not None:
            out.append((f"N={n}: fast level with naive at ≤ 1/20 of its memory",
                        f"{f.ms:.1f} vs {naive.ms:.1f} ms, {f.peak_mem_mb:.0f} vs {naive.peak_mem_mb:.0f} MB",
                        f.ms <= 1.05 * naive.ms and 20 * f.peak_mem_mb <= naive.peak_mem_mb))
        if cce is not None:
            out.append((f"N={n}: ≥ 2× faster than Cut Cross-Entropy", f"{cce.ms / f.ms:.2f}×", cce.ms >= 2 * f.ms))
        if trl is not None:
            out.append((f"N={n}: no slower than TRL's fused head", f"{f.ms:.1f} vs {trl.ms:.1f} ms", f.ms <= trl.ms))
        if lean is not None:
            out.append((f"N={n}: lean ≤ 1.10 × floor and ≤ 5.4 units",
                        f"{lean.peak_vs_floor:.3f} ×, {lean.time_vs_gemm:.2f} units",
                        lean.peak_vs_floor <= 1.10 and lean.time_vs_gemm <= 5.4))
    for n in sorted({r.N for r in rows if r.regime == "peaked"}):
        liger = ok.get(("liger", "peaked", n))
        best = min((r for r in (ok.get(("fused", "peaked", n)), ok.get(("fused-filter", "peaked", n))) if r),
                   key=lambda r: r.ms, default=None)
        if liger is not None and best is not None:
            out.append((f"N={n} peaked: faster than Liger's fused SimPO", f"{best.method} {best.ms:.1f} vs "
                        f"{liger.ms:.1f} ms", best.ms < liger.ms))
    return out


def parse_args(argv=None):
    epilog = ("methods:\n" + "\n".join(f"  {m:19s} {h}" for m, h in METHOD_HELP.items())
              + "\n\noutput columns:\n" + "\n".join(f"  {c:16s} {h}" for c, h in COLUMNS.items()))
    p = argparse.ArgumentParser(prog="bench_loss.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    p.add_argument("--T", type=int, nargs="+", help="tokens per response to sweep (default: GPU 1k..32k, CPU 64..256)")
    p.add_argument("--pairs", type=int, help="preference pairs per step (default: GPU fills the card, CPU 2)")
    p.add_argument("--H", type=int, help="hidden size (default: GPU 4096, CPU 256)")
    p.add_argument("--V", type=int, help="vocabulary size (default: GPU 128256, CPU 8192)")
    p.add_argument("--dtype", choices=list(DTYPES), help="input dtype (default: GPU bf16, CPU fp32)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help="methods to measure, listed below (default: all; those that cannot run here are listed "
                        "once, with why)")
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(DEFAULT_REGIMES), metavar="REGIME",
                   help=f"input regimes among {', '.join(REGIMES)} (default: {' '.join(DEFAULT_REGIMES)}); ragged: "
                        "long-tailed response lengths, for padded vs packed (fused-packed) rows")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (the median is reported, with the "
                   "spread max / min)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per row first")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--budget-mb", type=float, help="scratch budget of the fused paths (default: GPU the library's "
                   "64 MB, CPU 4 MB, scaled with the CPU head)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda when available; the CPU runs each row in a fresh process)")
    p.add_argument("--json", help="write the rows as a JSON list here")
    p.add_argument("--plot", help="write a PNG of memory and time vs T here")
    p.add_argument("--jsonl", help="append each row here as a JSON line as soon as it is measured")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    if args.T and min(args.T) < 2:
        p.error(f"--T values must be at least 2 (a response of one token has no next-token label), got {args.T}")
    for name in ("pairs", "H", "V", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1, got {value}")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args._worker:
        row = measure(Case(**json.loads(args._worker)))
        print("ROW " + json.dumps(asdict(row)), flush=True)
        return [row]
    cases = build_cases(args)
    card = device_name(args.device)
    started = time.time()
    def append(row: Row) -> None:
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(asdict(row) | {"card": card}) + "\n")

    rows = run_cases(cases, isolate=args.device != "cuda", progress=not args.no_progress, on_row=append)
    c0 = cases[0]
    budget = f"budget {c0.budget_mb:g} MB" if c0.budget_mb else "default budget"
    title = (f"α-DPO loss fwd+bwd on {card} — H={c0.H}, V={c0.V}, {c0.dtype}, {budget}, torch {torch.__version__}, "
             f"{_dt.date.today().isoformat()}")
    print_table(rows, title)
    for regime in args.regimes:
        ent = [r.entropy for r in rows if r.regime == regime and r.entropy is not None]
        if ent:
            print(f"mean token entropy, {regime}: {statistics.mean(ent):.2f} nats")
    for target, measured, met in performance_targets(rows):
        print(f"target {'MET   ' if met else 'MISSED'} {target}: {measured}")
    saved: dict[str, str] = {}
    if args.jsonl:
        saved["rows (appended as measured)"] = args.jsonl
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"card": card} for r in rows], f, indent=1)
        saved["rows"] = args.json
    if args.plot:
        plot(rows, args.plot, title)
        saved["plot"] = args.plot
    for line in summary_lines(rows, time.time() - started, args.repeats, saved):
        print(line)
    return rows


if __name__ == "__main__":
    main()
