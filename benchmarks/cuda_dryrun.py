"""CUDA dry run without a GPU: the whole op and the loss on fake "cuda" tensors at the real Llama-3-8B head.

    python benchmarks/cuda_dryrun.py                  # every case, one table row each; exit 1 on any failure
    python benchmarks/cuda_dryrun.py --quick          # the cases tests/test_cuda_dryrun.py runs
    python benchmarks/cuda_dryrun.py -k lean -k 64k   # cases whose id contains every -k

Everything runs under ``torch._subclasses.fake_tensor.FakeTensorMode`` with tensors on device ``cuda``: every aten
op runs its meta kernel (shapes, dtypes, strides, ``out_dtype`` GEMM signatures) and nothing is allocated, so
H = 4096, V = 128256 and 64k tokens cost seconds. What a CPU-only torch lacks is supplied here:

* **Device guard**: a two-line C++ library (``csrc/testing/fake_cuda_guard.cpp``, built once with
  ``torch.utils.cpp_extension.load``, needs ``ninja``) registers c10's no-op device guard for CUDA, without which
  indexing, ``copy_`` and ``out=`` decompositions refuse fake CUDA tensors.
* **A named card** (:class:`Card`, default "NVIDIA H200", sm_90, 132 SMs): ``torch.cuda.device`` (a context that
  tracks the *current device*), ``current_device``, ``get_device_properties`` / ``_capability`` / ``_name``,
  ``device_count``, ``current_stream``, ``is_available`` and ``synchronize`` are patched to fakes; the
  ``out_dtype`` GEMM probe (``gemm._cuda_has``) answers True, as torch ≥ 2.8 on sm_90 does.
* **Data-dependent ops** (``nonzero``, boolean masks, ``.item()``, ``bool(t)``, ``.tolist()``): :class:`ShadowMode`
  keeps a real CPU *shadow* of every small fake tensor whose value is known (the labels, ``cu_seqlens``, reference
  log-probs, and whatever small tensors are computed from them) and answers those ops from the shadows. A tensor
  a kernel writes loses its shadow (its value is unknown); a data-dependent op on it fails the case.
* **Triton launches** (``JITFunction.run``) and the **CUDA epilogue** (``_extension.cuda_module()``, a fake module
  with the pybind signatures of ``csrc/cuda_epilogue.cu``; fake tensors hand out fake ``data_ptr`` addresses that
  map back to their storage) are replaced by recorders. Each launch is checked against :data:`KERNEL_SPECS`:
  argument dtypes and layouts, every element the kernel addresses inside its allocation (the largest offset each
  pointer reaches, computed from the launch's scalars, constexprs and grid, against the fake storage's size),
  the int32 index arithmetic the kernels rely on, the grid (covers the work exactly, within CUDA's limits
  x < 2³¹, y/z ≤ 65535), and the device: every tensor on the device that is current at the launch (the library's
  ``launch_device`` / ``_on_device`` contexts are what make it current; cases on ``cuda:1`` prove it).
* **Autograd**: the C++ engine asks for a CUDA stream, so :func:`run_backward` walks the ``grad_fn`` graph in
  Python as the engine does: dependencies counted, each node called once its gradients are in, dtypes of the
  gradients cast to their consumers' metadata (``validate_outputs``: autograd's own casts, which cost memory), and
  leaf gradients stolen into ``.grad`` (or cloned to the leaf's layout, as ``AccumulateGrad`` does).

Per case: peak live bytes of fake CUDA storages (forward; backward including ``.grad``) against the memory bounds of docs/design.md §3
(fast ≤ F + 4·min(N_live, V)·H + 64 MiB, lean ≤ 1.10·F, F = dH + dW in their dtypes); nothing weight-sized
allocated or saved by the forward; both gradients arrive in their leaves' dtypes; GEMM units (backward exactly
3 fast / 4 lean of N_live·V·H, forward between 1 and N/N_live; every torch GEMM of the run must be one the paths
account for) and every GEMM on bf16 operands (no float32 upcast on the GPU path; ``out_dtype`` where a float32
result is wanted); host syncs (:func:`alphadpo_kernels.ops.sequence_logps.instrument.count_host_syncs`: one for
the value checks, one per cuBLAS forward, one in the backward); every launch checked.

Not proven here: numerics and compilation (the interpreter tests and ``benchmarks/compile_check.py``), that the
kernels mask every lane past N / V / H (the specs assume it; the interpreter tests exercise the tails), the CUDA
caching allocator's rounding and fragmentation, cuBLAS workspaces, speed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import heapq
import inspect
import itertools
import os
import sys
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD_SOURCE = os.path.join(ROOT, "csrc", "testing", "fake_cuda_guard.cpp")
GUARD_BUILD_DIR = os.path.join(ROOT, "build", "fake_cuda_guard")

aten = torch.ops.aten
GiB, MiB = 2**30, 2**20


class DryRunError(AssertionError):
    """A check of the dry run failed: the message says which and why."""


# ------------------------------------------------------------------------------------------------- device guard


@functools.cache
def ensure_device_guard() -> None:
    """Register the no-op CUDA device guard (once per process). A CUDA build of torch has a real one."""
    if torch.cuda.is_available() or torch.version.cuda is not None:
        return
    from torch.utils.cpp_extension import load

    os.makedirs(GUARD_BUILD_DIR, exist_ok=True)
    load("alphadpo_fake_cuda_guard", sources=[GUARD_SOURCE], build_directory=GUARD_BUILD_DIR,
         is_python_module=False, verbose=False)


# ------------------------------------------------------------------------------------------------- the fake card


@dataclass(frozen=True)
class Card:
    name: str = "NVIDIA H200"
    major: int = 9
    minor: int = 0
    multi_processor_count: int = 132
    total_memory: int = 141 * 10**9
    count: int = 2  # cuda:0 and cuda:1, so that a head on the second card can be tried


class FakeStream:
    def __init__(self, index: int):
        self.device = torch.device("cuda", index)
        self.cuda_stream = 0x5_0000 + index  # what the extension receives; checked against the launch device

    def synchronize(self):
        pass


class FakeCuda:
    """The ``torch.cuda`` functions the library calls, answered for :class:`Card`; tracks the current device."""

    def __init__(self, card: Card):
        self.card = card
        self.current = 0
        self.props = types.SimpleNamespace(name=card.name, major=card.major, minor=card.minor,
                                           multi_processor_count=card.multi_processor_count,
                                           total_memory=card.total_memory)
        self.calls: list[str] = []

    def index(self, device) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"torch.cuda called with a {device.type} device: {device}")
        return self.current if device.index is None else device.index

    def device_ctx(outer, device):  # noqa: N805 - bound as torch.cuda.device
        class _Device:
            def __init__(self):
                self.idx = -1 if device is None else outer.index(device)

            def __enter__(self):
                self.prev = outer.current
                if self.idx >= 0:
                    if self.idx >= outer.card.count:
                        raise RuntimeError(f"CUDA error: invalid device ordinal {self.idx}")
                    outer.current = self.idx
                return self

            def __exit__(self, *exc):
                outer.current = self.prev
                return False
        return _Device()

    def patches(self) -> dict:
        c = self

        def props(device=None):
            c.calls.append("get_device_properties")
            return c.props

        return {
            "is_available": lambda: True,
            "device_count": lambda: c.card.count,
            "current_device": lambda: c.current,
            "device": self.device_ctx,
            "get_device_properties": props,
            "get_device_capability": lambda device=None: (c.card.major, c.card.minor),
            "get_device_name": lambda device=None: c.card.name,
            "current_stream": lambda device=None: FakeStream(c.index(device)),
            "synchronize": lambda device=None: None,
            "empty_cache": lambda: None,
        }


@contextlib.contextmanager
def patched(obj, **attrs):
    saved = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


# ------------------------------------------------------------------------------------------------- storages


def storage_key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def storage_elements(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() // t.element_size()


def describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)} stride {t.stride()} on {t.device}"


# ------------------------------------------------------------------------------------------------- shadows

SHADOW_LIMIT = 2**22  # elements: small tensors (labels, cu_seqlens, per-token vectors) get a real CPU shadow

DATA_DEPENDENT = {"nonzero", "masked_select", "_local_scalar_dense", "item", "is_nonzero", "equal", "unique_dim",
                  "_unique", "_unique2", "unique_consecutive", "bincount", "allclose", "repeat_interleave"}


def _is_bool_index(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bool, torch.uint8)


class ShadowMode(TorchDispatchMode):
    """Answers data-dependent ops on fake tensors from real CPU shadows of the small tensors whose value is known.

    Enter it inside the ``FakeTensorMode``. Every op whose fake tensor inputs all have shadows, and whose outputs
    are small, is also run on the shadows (devices mapped to the CPU), so views and in-place updates carry their
    values; an op that writes a shadowed tensor from an input without a shadow, and every kernel write
    (:meth:`forget`), drops the shadows of that storage."""

    def __init__(self):
        super().__init__()
        self.shadows: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.unknown: set[int] = set()  # storages whose values no shadow knows any more
        self.answered: list[str] = []

    # -- public
    def attach(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with _disable_current_modes():
            self.shadows[fake] = real.detach().clone()
        return fake

    def forget(self, t: torch.Tensor) -> None:
        self.unknown.add(storage_key(t))

    def shadow(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        if not _is_fake(t):
            return t  # a real tensor is its own value
        if storage_key(t) in self.unknown:
            return None
        return self.shadows.get(t)

    # -- dispatch
    def _real_args(self, args, kwargs):
        missing = []

        def conv(x):
            if isinstance(x, torch.Tensor):
                s = self.shadow(x)
                if s is None:
                    missing.append(x)
                return s
            if isinstance(x, torch.device) and x.type == "cuda":
                return torch.device("cpu")
            return x
        return tree_map(conv, args), tree_map(conv, kwargs), missing

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket.__name__
        data_dependent = packet in DATA_DEPENDENT and not (packet == "repeat_interleave"
                                                           and func._overloadname == "self_int")
        if packet == "index" and any(_is_bool_index(i) for i in (args[1] if len(args) > 1 else ())):
            data_dependent = True
        if packet == "_to_copy" and _is_fake(args[0]) \
                and torch.device(kwargs.get("device") or args[0].device).type == "cpu":
            data_dependent = True  # .cpu() / .tolist(): the host reads the value
        if data_dependent:
            return self._answer(func, packet, args, kwargs)
        out = func(*args, **kwargs)
        if self.unknown:  # a new storage may reuse a freed one's address: it starts out known
            inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and storage_key(t) not in inputs:
                    self.unknown.discard(storage_key(t))
        self._propagate(func, args, kwargs, out)
        return out

    def _answer(self, func, packet, args, kwargs):
        rargs, rkwargs, missing = self._real_args(args, kwargs)
        if missing:
            raise DryRunError(f"aten.{packet} needs the value of {describe(missing[0])}, which the dry run does not "
                              "know (a kernel wrote it, or it is derived from a large tensor)")
        with _disable_current_modes():
            real = func(*rargs, **rkwargs)
        self.answered.append(f"aten.{packet}")
        if not isinstance(real, torch.Tensor):
            return real
        if packet == "_to_copy":
            return real  # the host holds the value
        dev = next(x.device for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor) and _is_fake(x))
        fake = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=dev)
        self.shadows[fake] = real
        return fake

    def _propagate(self, func, args, kwargs, out):
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        mutated = _mutated_args(func, args, kwargs)
        if not outs and not mutated:
            return
        rargs, rkwargs, missing = self._real_args(args, kwargs)
        big = any(t.numel() > SHADOW_LIMIT for t in outs + mutated)
        if missing or big:
            for t in mutated:
                self.forget(t)
            return
        try:
            with _disable_current_modes():
                real = func(*rargs, **rkwargs)
        except Exception:  # noqa: BLE001 - an op the CPU lacks (out_dtype GEMMs): the value is simply unknown
            for t in outs + mutated:
                self.forget(t)
            return
        reals = [t for t in tree_flatten(real)[0] if isinstance(t, torch.Tensor)]
        if len(reals) != len(outs):
            return
        for f, r in zip(outs, reals):
            if _is_fake(f) and f not in self.shadows and tuple(f.shape) == tuple(r.shape):
                self.shadows[f] = r


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _mutated_args(func, args, kwargs) -> list[torch.Tensor]:
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        v = args[i] if i < len(args) else kwargs.get(a.name)
        out += [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
    return out


# ------------------------------------------------------------------------------------------------- live bytes


class LiveBytes(TorchDispatchMode):
    """Peak of live bytes of fake CUDA storages allocated inside the block (tests/test_memory.py's LiveBytes,
    keyed by storage identity since fake storages have no addresses). Storages that existed before are never
    counted; a storage stays live while any tensor seen on it is alive."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list] = {}
        self.largest: tuple[int, str] = (0, "")

    def _release(self, key):
        entry = self._refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self._refs[key]

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
                continue
            key = storage_key(t)
            entry = self._refs.get(key)
            if entry is None:
                if key in inputs:
                    continue
                nbytes = t.untyped_storage().nbytes()
                entry = self._refs[key] = [0, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                if nbytes > self.largest[0]:
                    self.largest = (nbytes, f"{func}: {describe(t)}")
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out


# ------------------------------------------------------------------------------------------------- launches


@dataclass
class Access:
    arg: str
    last: int  # largest element offset addressed from the pointer (-1: none)
    write: bool = False


@dataclass
class Launch:
    kernel: str
    grid: tuple
    device: int  # current device at the launch
    tensors: dict[str, str]
    scalars: dict
    accesses: list[Access] = field(default_factory=list)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


INT32_MAX = 2**31 - 1
HALF = (torch.bfloat16, torch.float16, torch.float32)


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise DryRunError(what)


def _head_dtypes(a, h="h_ptr", w="w_ptr", b="b_ptr", has_bias=True):
    _expect(a[h].dtype in HALF, f"{h} dtype {a[h].dtype}")
    _expect(a[w].dtype in (a[h].dtype, torch.float32), f"{w} is {a[w].dtype} beside {h} {a[h].dtype}: the kernel "
            "casts wider (float32 master) weight tiles only")
    if has_bias:
        _expect(a[b].dtype in (a[h].dtype, torch.float32), f"{b} dtype {a[b].dtype}")


def spec_forward(a: dict, grid: tuple) -> list[Access]:
    n, v, h = a["N"], a["V"], a["H"]
    bm, bn, tps = a["BLOCK_M"], a["BLOCK_N"], a["TILES_PER_SPLIT"]
    splits = cdiv(cdiv(v, bn), tps)
    _head_dtypes(a, has_bias=a["HAS_BIAS"])
    _expect(a["tgt_ptr"].dtype == torch.int64, f"tgt_ptr dtype {a['tgt_ptr'].dtype}")
    part = a["part_ptr"]
    _expect(part.dtype == torch.float32 and part.is_contiguous() and tuple(part.shape) == (3, splits, n),
            f"part_ptr must be a contiguous float32 [3, {splits}, {n}] buffer, got {describe(part)}")
    _expect(grid == (cdiv(n, bm) * splits,),
            f"grid {grid} != (cdiv(N, BLOCK_M) · splits,) = ({cdiv(n, bm) * splits},)")
    _expect((splits - 1) * tps * bn < v, f"the last of {splits} splits holds no column (its m_i stays -inf)")
    _expect(3 * splits * n <= INT32_MAX, f"3·splits·N = {3 * splits * n} overflows the kernel's int32 split stride")
    acc = [Access("h_ptr", (n - 1) * a["stride_hn"] + (h - 1) * a["stride_hk"]),
           Access("w_ptr", (v - 1) * a["stride_wv"] + (h - 1) * a["stride_wk"]),
           Access("tgt_ptr", n - 1), Access("part_ptr", 3 * splits * n - 1, write=True)]
    if a["HAS_BIAS"]:
        acc.append(Access("b_ptr", v - 1))
    return acc


def spec_merge(a: dict, grid: tuple) -> list[Access]:
    n, s = a["N"], a["SPLITS"]
    _expect(grid == (cdiv(n, a["BLOCK"]),), f"grid {grid} does not cover N = {n} in blocks of {a['BLOCK']}")
    _expect(3 * s * n <= INT32_MAX, f"3·SPLITS·N = {3 * s * n} overflows the merge's int32 offsets")
    for name in ("part_ptr", "lse_ptr", "logp_ptr"):
        _expect(a[name].dtype == torch.float32, f"{name} dtype {a[name].dtype}")
    _expect(a["tgt_ptr"].dtype == torch.int64, f"tgt_ptr dtype {a['tgt_ptr'].dtype}")
    return [Access("part_ptr", 3 * s * n - 1), Access("tgt_ptr", n - 1), Access("lse_ptr", n - 1, write=True),
            Access("logp_ptr", n - 1, write=True)]


def spec_grad_logits(a: dict, grid: tuple) -> list[Access]:
    m, vc, h = a["M"], a["VC"], a["H"]
    bm, bn = a["BLOCK_M"], a["BLOCK_N"]
    _head_dtypes(a, has_bias=a["HAS_BIAS"])
    dz = a["dz_ptr"]
    _expect(dz.dtype == a["h_ptr"].dtype, f"dz {dz.dtype} is not the hidden states' {a['h_ptr'].dtype}")
    _expect(dz.dim() == 2 and tuple(dz.shape) == (m, vc) and (dz.stride(1) == 1 or vc == 1)
            and a["stride_dzm"] == dz.stride(0), f"dz must be [M, VC] with unit column stride (the kernel assumes "
            f"it), got {describe(dz)} with stride_dzm {a['stride_dzm']}")
    for name in ("lse_ptr", "g_ptr"):
        _expect(a[name].dtype == torch.float32, f"{name} dtype {a[name].dtype}")
    _expect(a["tgt_ptr"].dtype == torch.int64, f"tgt_ptr dtype {a['tgt_ptr'].dtype}")
    _expect(grid == (cdiv(m, bm) * cdiv(vc, bn),), f"grid {grid} != ({cdiv(m, bm) * cdiv(vc, bn)},)")
    acc = [Access("h_ptr", (m - 1) * a["stride_hm"] + (h - 1) * a["stride_hk"]),
           Access("w_ptr", (vc - 1) * a["stride_wv"] + (h - 1) * a["stride_wk"]),
           Access("tgt_ptr", m - 1), Access("lse_ptr", m - 1), Access("g_ptr", m - 1),
           Access("dz_ptr", (m - 1) * a["stride_dzm"] + vc - 1, write=True)]
    if a["HAS_BIAS"]:
        acc.append(Access("b_ptr", vc - 1))
    if a["NEED_DB"]:
        _expect(a["dbp_ptr"].dtype == torch.float32, "dbp_ptr dtype")
        acc.append(Access("dbp_ptr", cdiv(m, bm) * vc - 1, write=True))
    return acc


def spec_skip_backward(a: dict, grid: tuple) -> list[Access]:
    n, v, h = a["N"], a["V"], a["H"]
    bm, bn = a["BLOCK_M"], a["BLOCK_N"]
    _head_dtypes(a, has_bias=a["HAS_BIAS"])
    _expect(grid == (cdiv(n, bm) * cdiv(v, bn),), f"grid {grid} != ({cdiv(n, bm) * cdiv(v, bn)},)")
    acc = [Access("h_ptr", (n - 1) * a["stride_hn"] + (h - 1) * a["stride_hk"]),
           Access("w_ptr", (v - 1) * a["stride_wv"] + (h - 1) * a["stride_wk"]),
           Access("tgt_ptr", n - 1), Access("lse_ptr", n - 1), Access("g_ptr", n - 1)]
    if a["NEED_DH"]:  # dH and dW are indexed with row stride H: they must be contiguous float32
        _expect(a["dh_ptr"].dtype == torch.float32 and a["dh_ptr"].is_contiguous(), "dh_ptr: contiguous float32")
        acc.append(Access("dh_ptr", (n - 1) * h + h - 1, write=True))
    if a["NEED_DW"]:
        _expect(a["dw_ptr"].dtype == torch.float32 and a["dw_ptr"].is_contiguous(), "dw_ptr: contiguous float32")
        acc.append(Access("dw_ptr", (v - 1) * h + h - 1, write=True))
    if a["NEED_DB"]:
        acc.append(Access("db_ptr", v - 1, write=True))
    if a["HAS_BIAS"]:
        acc.append(Access("b_ptr", v - 1))
    if a["COUNT_SKIPS"]:
        acc.append(Access("skip_count_ptr", 0, write=True))
    return acc


KERNEL_SPECS: dict[str, Callable[[dict, tuple], list[Access]]] = {
    "_sequence_logps_fwd_kernel": spec_forward,
    "_merge_splits_kernel": spec_merge,
    "_grad_logits_kernel": spec_grad_logits,
    "_skip_backward_kernel": spec_skip_backward,
}

LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
                  "launch_pdl", "debug"}


def check_grid(grid: tuple) -> None:
    _expect(1 <= len(grid) <= 3, f"grid {grid}")
    limits = (INT32_MAX, 65535, 65535)
    for g, lim in zip(grid, limits):
        _expect(isinstance(g, int) and 1 <= g <= lim, f"grid {grid} outside CUDA's limits (x < 2³¹, y/z ≤ 65535)")


def check_access(name: str, t: torch.Tensor, last: int, what: str) -> None:
    if last < 0:
        return
    end = t.storage_offset() + last
    size = storage_elements(t)
    _expect(end < size, f"{what}: {name} addresses element {end} of an allocation of {size} "
            f"({describe(t)}, storage offset {t.storage_offset()})")


class Recorder:
    """Replaces Triton launches and the CUDA epilogue's entry points: checks and records each call."""

    def __init__(self, fake_cuda: FakeCuda, shadows: ShadowMode):
        self.cuda, self.shadows = fake_cuda, shadows
        self.launches: list[Launch] = []
        self.errors: list[str] = []
        self.pointers: dict[int, tuple] = {}  # fake address -> (storage key, nbytes, device, dtype)
        self._next_base = itertools.count(1)
        self._bases: dict[int, int] = {}

    def check_devices(self, kernel: str, tensors: dict[str, torch.Tensor]) -> int:
        cur = self.cuda.current
        for name, t in tensors.items():
            _expect(t.device.type == "cuda", f"{kernel}: {name} is on {t.device}, not a CUDA device")
            _expect(t.device.index == cur, f"{kernel}: {name} is on {t.device} but the current device at the launch "
                    f"is cuda:{cur} (the launch must run inside launch_device / torch.cuda.device of its tensors)")
        return cur

    strict = True  # raise at the first failed check (else collect them in ``errors`` and go on)

    def _guarded(self, check, *args):
        try:
            return check(*args)
        except DryRunError as exc:
            if self.strict:
                raise
            msg = str(exc)
            if msg not in self.errors:
                self.errors.append(msg)

    def triton_run(self, jit, args, kwargs, grid):
        self._guarded(self._triton_run, jit, args, kwargs, grid)

    def extension_call(self, fn: str, a: dict):
        self._guarded(self._extension_call, fn, a)

    # -- Triton
    def _triton_run(self, jit, args, kwargs, grid):
        name = jit.fn.__name__
        kw = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
        bound = inspect.signature(jit.fn).bind(*args, **kw)
        bound.apply_defaults()
        a = dict(bound.arguments)
        if callable(grid):
            grid = grid(a)
        grid = tuple(int(g) for g in grid)
        what = f"{name}[{grid}]"
        check_grid(grid)
        tensors = {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}
        cur = self.check_devices(what, tensors)
        spec = KERNEL_SPECS.get(name)
        _expect(spec is not None, f"no address spec for the Triton kernel {name}: add one to KERNEL_SPECS")
        try:
            accesses = spec(a, grid)
        except KeyError as exc:
            raise DryRunError(f"{what}: the kernel's signature changed, its spec reads {exc}") from None
        for acc in accesses:
            check_access(acc.arg, a[acc.arg], acc.last, what)
            if acc.write:
                self.shadows.forget(a[acc.arg])
        self.launches.append(Launch(name, grid, cur, {k: describe(v) for k, v in tensors.items()},
                                    {k: v for k, v in a.items() if not isinstance(v, torch.Tensor)}, accesses))

    # -- fake addresses for the extension's raw pointers
    def data_ptr(self, t: torch.Tensor) -> int:
        key = storage_key(t)
        base = self._bases.get(key)
        if base is None:
            base = self._bases[key] = next(self._next_base) << 44
        ptr = base + t.storage_offset() * t.element_size()
        self.pointers[base] = (key, t.untyped_storage().nbytes(), t.device)
        self.pointers[ptr] = self.pointers[base] + (t.dtype,)
        return ptr

    def resolve(self, what: str, name: str, ptr: int, itemsize: int, last: int, dtype, write: bool):
        entry = self.pointers.get(ptr)
        _expect(entry is not None and len(entry) == 4, f"{what}: {name} = {ptr:#x} is no tensor's data_ptr()")
        key, nbytes, device, t_dtype = entry
        _expect(t_dtype == dtype, f"{what}: {name} points at {t_dtype} data, the kernel reads it as {dtype}")
        _expect(device.index == self.cuda.current, f"{what}: {name} is on {device} but the current device is "
                f"cuda:{self.cuda.current}")
        base = ptr & ~((1 << 44) - 1)
        end = ptr - base + (last + 1) * itemsize
        _expect(end <= nbytes, f"{what}: {name} reaches byte {end} of an allocation of {nbytes}")
        if write:
            self.shadows.unknown.add(key)
        return Access(name, last, write)

    def _extension_call(self, fn: str, a: dict):
        what = f"_C_cuda.{fn}"
        n, v, ld = a["n"], a["v"], a["ld"]
        stream = a["stream"]
        _expect(stream == FakeStream(self.cuda.current).cuda_stream,
                f"{what}: stream {stream:#x} is not the current device's (cuda:{self.cuda.current}) current stream")
        _expect(n >= 0 and v >= 1 and ld >= v, f"{what}: n={n} v={v} ld={ld}")
        last = (n - 1) * ld + v - 1 if n else -1
        f32, i64 = torch.float32, torch.int64
        acc = [self.resolve(what, "logits", a["logits"], 4, last, f32, fn != "grad_logits_to" or a["keep"]),
               self.resolve(what, "targets", a["targets"], 8, n - 1, i64, False)]
        vectors = {"lse_update": ("m", "s", "tz"), "grad_logits": ("lse", "g"), "grad_logits_to": ("lse", "g")}[fn]
        for name in vectors:
            acc.append(self.resolve(what, name, a[name], 4, n - 1, f32, fn == "lse_update"))
        if fn == "grad_logits_to":
            dtype = {0: torch.bfloat16, 1: torch.float16}.get(a["out_dtype"])
            _expect(dtype is not None, f"{what}: out_dtype code {a['out_dtype']}")
            _expect(a["out_ld"] >= v, f"{what}: out_ld {a['out_ld']} < v {v}")
            acc.append(self.resolve(what, "out", a["out"], 2, (n - 1) * a["out_ld"] + v - 1 if n else -1, dtype, True))
        self.launches.append(Launch(what, (), self.cuda.current, {}, dict(a), acc))


def fake_extension_module(rec: Recorder):
    """``alphadpo_kernels._C_cuda`` with the pybind signatures of csrc/cuda_epilogue.cu: records each call."""

    def lse_update(logits, n, v, ld, targets, v_offset, softcap, m, s, tz, stream):
        rec.extension_call("lse_update", dict(locals()))

    def grad_logits(logits, n, v, ld, targets, v_offset, softcap, lse, g, stream):
        rec.extension_call("grad_logits", dict(locals()))

    def grad_logits_to(logits, n, v, ld, targets, v_offset, softcap, lse, g, out, out_ld, out_dtype, keep, stream):
        rec.extension_call("grad_logits_to", dict(locals()))

    return types.SimpleNamespace(lse_update=lse_update, grad_logits=grad_logits, grad_logits_to=grad_logits_to,
                                 device_count=lambda: rec.cuda.card.count, __name__="alphadpo_kernels._C_cuda (fake)")


# ------------------------------------------------------------------------------------------------- autograd


def run_backward(root: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    """``root.backward(grad)`` by walking the ``grad_fn`` graph in Python, as the engine does: dependencies
    counted; a node runs once all its gradients are in (latest-created first); gradients cast to the dtype each
    consumer recorded (``validate_outputs``); leaves' gradients stolen into ``.grad`` when their layout matches
    (else cloned into the leaf's layout, as ``AccumulateGrad`` does), accumulated when ``.grad`` exists. Each
    gradient is released as soon as its node has run; saved tensors are freed after their node."""
    if grad is None:
        grad = torch.ones_like(root)
    fn0 = root.grad_fn
    _expect(fn0 is not None, "the output does not require grad")
    deps: dict = {}
    stack, seen = [fn0], {fn0}
    while stack:
        fn = stack.pop()
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            deps[nxt] = deps.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    buffers: dict = {fn0: {0: grad}}
    del grad
    order = itertools.count()
    ready = [(-_seq(fn0), next(order), fn0)]
    with torch.no_grad():
        while ready:
            _, _, fn = heapq.heappop(ready)
            inputs = buffers.pop(fn, {})
            n_in = len(fn._input_metadata) if hasattr(fn, "_input_metadata") else max(inputs, default=0) + 1
            grads = tuple(inputs.get(i) for i in range(n_in))
            del inputs
            if type(fn).__name__ == "AccumulateGrad":
                _accumulate(fn.variable, grads[0])
                del grads
                continue
            outs = fn.apply(*grads) if hasattr(fn, "_forward_cls") else fn(*grads)  # custom Functions: .apply
            del grads
            if not isinstance(outs, tuple):
                outs = (outs,)
            for (nxt, nr), g in zip(fn.next_functions, outs):
                if nxt is None:
                    continue
                if g is not None:
                    meta = nxt._input_metadata[nr]  # the engine's validate_outputs: shape, then dtype, then device
                    if tuple(g.shape) != tuple(meta.shape):
                        try:  # a broadcast input: its gradient is summed back to its shape
                            g = g.sum_to_size(meta.shape)
                        except RuntimeError:
                            raise DryRunError(f"{type(fn).__name__} returned a gradient of shape {tuple(g.shape)} "
                                              f"for {type(nxt).__name__} expecting {tuple(meta.shape)}") from None
                    if g.dtype != meta.dtype:  # a gradient takes its input's dtype: autograd's own cast
                        g = g.to(meta.dtype)
                    _expect(g.device == meta.device, f"{type(fn).__name__} returned a gradient on {g.device} for "
                            f"an input on {meta.device}")
                    buf = buffers.setdefault(nxt, {})
                    buf[nr] = g if nr not in buf else buf[nr] + g
                deps[nxt] -= 1
                if deps[nxt] == 0:
                    heapq.heappush(ready, (-_seq(nxt), next(order), nxt))
            del outs, g


def _seq(fn) -> int:
    try:
        return fn._sequence_nr()
    except (AttributeError, RuntimeError):
        return 0


def _accumulate(var: torch.Tensor, g: torch.Tensor | None) -> None:
    """AccumulateGrad: steal a gradient that obeys the leaf's layout, else clone it into that layout
    (``clone_obey_contract``); add into an existing ``.grad``."""
    if g is None:
        return
    if var.grad is None:
        if not _same_layout(g, var):
            g = torch.empty_strided(var.shape, var.stride(), dtype=var.dtype, device=var.device).copy_(g)
        var.grad = g.detach()
    else:
        var.grad += g


def _same_layout(g: torch.Tensor, var: torch.Tensor) -> bool:
    return all(gs == vs for gs, vs, n in zip(g.stride(), var.stride(), var.shape) if n > 1)


class TorchGemmFlops(TorchDispatchMode):
    """Flops of every aten matrix product (tests/test_structure.py's count), to hold the paths' own GEMM
    accounting to what they really issue."""

    PACKETS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.matmul}

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.signatures: dict[str, int] = {}  # "aten.addmm(bf16 x bf16 -> float32, out_dtype)" -> calls

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in self.PACKETS:
            a, b = (args[0], args[1]) if func.overloadpacket in (aten.mm, aten.bmm, aten.matmul) else (args[1], args[2])
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            dt = lambda t: str(t.dtype).replace("torch.", "")  # noqa: E731
            result = out if isinstance(out, torch.Tensor) else kwargs.get("out")
            sig = (f"aten.{func.overloadpacket.__name__}({dt(a)} x {dt(b)} -> {dt(result)}"
                   + (", out_dtype" if "out_dtype" in kwargs or any(isinstance(x, torch.dtype) for x in args) else "")
                   + ")")
            self.signatures[sig] = self.signatures.get(sig, 0) + 1
        return out


# ------------------------------------------------------------------------------------------------- the fake world


@contextlib.contextmanager
def fake_cuda_world(card: Card = Card()):
    """Everything a CPU-only torch needs to run the library's CUDA paths on fake tensors. Yields
    ``(fake_mode, shadows, recorder, fake_cuda)``; the caller enters ``fake_mode`` and then ``shadows``."""
    ensure_device_guard()
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    import triton.runtime.jit as triton_jit

    from alphadpo_kernels import _extension
    from alphadpo_kernels.ops.sequence_logps import gemm, triton_common, tuning

    fake_cuda = FakeCuda(card)
    shadows = ShadowMode()
    rec = Recorder(fake_cuda, shadows)
    module = fake_extension_module(rec)

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        rec.triton_run(self, args, kwargs, grid)

    kernel_classes = [triton_jit.JITFunction]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        kernel_classes.append(InterpretedFunction)
    caches = [c for c in (getattr(triton_common, "_sm_count", None), getattr(tuning, "_device_name", None)) if c]
    for c in caches:
        c.cache_clear()
    old_env = os.environ.get("ALPHADPO_TUNING_CACHE")
    os.environ["ALPHADPO_TUNING_CACHE"] = os.path.join(GUARD_BUILD_DIR, "no-tuning-cache.json")  # arch defaults
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(patched(torch.cuda, **fake_cuda.patches()))
            for cls in kernel_classes:
                stack.enter_context(patched(cls, run=run))
            stack.enter_context(patched(FakeTensor, data_ptr=lambda self: rec.data_ptr(self)))
            stack.enter_context(patched(_extension, cuda_module=lambda: module))
            stack.enter_context(patched(gemm, _cuda_has=lambda *a, **k: True))  # torch ≥ 2.8 on sm_90
            yield FakeTensorMode(allow_non_fake_inputs=False), shadows, rec, fake_cuda
    finally:
        for c in caches:
            c.cache_clear()
        if old_env is None:
            os.environ.pop("ALPHADPO_TUNING_CACHE", None)
        else:
            os.environ["ALPHADPO_TUNING_CACHE"] = old_env


# ------------------------------------------------------------------------------------------------- cases

HDIM, VOCAB = 4096, 128256  # the Llama-3-8B head
K = 1024


@dataclass(frozen=True)
class Case:
    what: str = "op"  # "op": fused_sequence_logps; "loss": FusedAlphaDPOLoss (shift=True, given references);
    # "lossfn": fused_alpha_dpo_loss (shift=True) with a reference head (ref_hidden, ref_weight: its forward too)
    n_tok: int = 16 * K
    layout: str = "padded"  # "padded" [4, N/4, H] with masked prompts and right padding; "packed" [N, H] + cu_seqlens;
    # "dense": [4, N/4, H] with every token live (README's computed ratios)
    memory: str = "fast"
    backend: str = "triton"
    head: str = "bf16"  # "bf16", or "fp32": float32 master weight beside bf16 hidden states
    device: str = "cuda"
    filter: bool = False  # opt-in tile skipping (triton)
    bias: bool = False  # an LM-head bias [V] (needs its gradient) and Gemma-2's soft-cap 30
    hdim: int = HDIM
    vocab: int = VOCAB

    @property
    def id(self) -> str:
        parts = [self.what, f"{self.n_tok // K}k", self.layout, self.memory, self.backend, self.head]
        if self.device != "cuda":
            parts.append(self.device.replace(":", ""))
        if self.filter:
            parts.append("filter")
        if self.bias:
            parts.append("bias-softcap")
        if (self.hdim, self.vocab) != (HDIM, VOCAB):
            parts.append(f"H{self.hdim}V{self.vocab}")
        return "-".join(parts)


@dataclass
class Result:
    case: Case
    ok: bool = False
    failures: list[str] = field(default_factory=list)
    n_live: int = 0
    floor: int = 0
    bound: float = 0.0
    fwd_peak: int = 0
    fwd_largest: str = ""
    bwd_peak: int = 0
    bwd_largest: str = ""
    fwd_units: float = 0.0
    bwd_units: float = 0.0
    fwd_syncs: list[str] = field(default_factory=list)
    bwd_syncs: list[str] = field(default_factory=list)
    launches: int = 0
    launch_kinds: dict = field(default_factory=dict)
    gemms: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    def launch_lines(self, limit: int) -> list[str]:
        out = []
        for ln in getattr(self, "launch_log", [])[:limit]:
            reach = ", ".join(f"{a.arg}≤{a.last}{'(w)' if a.write else ''}" for a in ln.accesses)
            out.append(f"    {ln.kernel} grid={ln.grid} cuda:{ln.device} {ln.tensors or ''} reach: {reach}")
        return out

    def row(self) -> str:
        gib = self.bwd_peak / GiB
        status = "PASS" if self.ok else "FAIL"
        kinds = ",".join(f"{k.replace('_kernel', '').lstrip('_')}×{v}" for k, v in sorted(self.launch_kinds.items()))
        return (f"{self.case.id:<44} {self.n_live:>6} {self.fwd_peak / GiB:>7.3f} {gib:>7.3f} {self.bound / GiB:>7.3f} "
                f"{(self.bwd_peak / self.floor if self.floor else 0):>5.2f} "
                f"{self.fwd_units:>5.2f}+{self.bwd_units:<4.2f} "
                f"{len(self.fwd_syncs):>2}/{len(self.bwd_syncs):<2} {self.launches:>5} {self.seconds:>5.1f}s {status}"
                + (f"  {kinds}" if kinds else ""))


HEADER = (f"{'case':<44} {'N_live':>6} {'fwdGiB':>7} {'bwdGiB':>7} {'bound':>7} {'xF':>5} {'units':>10} "
          f"{'sync':>5} {'launch':>5} {'time':>6} status")


def _labels(case: Case):
    """Real CPU labels (and cu_seqlens): masked prompts, right padding, ragged packed sequences."""
    g = torch.Generator().manual_seed(0)
    n, v = case.n_tok, case.vocab
    if case.layout in ("padded", "dense"):
        rows, t = 4, n // 4
        labels = torch.randint(0, v, (rows, t), generator=g)
        for r in range(rows if case.layout == "padded" else 0):
            labels[r, : t // 8 + 13 * r] = -100  # prompts
            if r % 2:
                labels[r, t - t // 16 - r:] = -100  # right padding
        return labels, None
    fractions = (0.35, 0.15, 0.3, 0.2)
    lens = [int(f * n) for f in fractions]
    lens[-1] = n - sum(lens[:-1])
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    labels = torch.randint(0, v, (n,), generator=g)
    for s in range(len(lens)):
        labels[cu[s]: cu[s] + lens[s] // 8 + 7 * s] = -100
    return labels, cu


def _n_live(case: Case, labels, cu, shift: bool) -> int:
    from alphadpo_kernels.ops.sequence_logps import packed_layout, shift_packed_labels
    from alphadpo_kernels.ops.sequence_logps.naive import shift_labels

    if cu is None:
        lab = shift_labels(labels, -100) if shift else labels
    else:
        lab = shift_packed_labels(labels, packed_layout(cu, labels.numel())[1], -100) if shift else labels
    return int((lab != -100).sum())


def _find_node(root: torch.Tensor, name: str):
    stack, seen = [root.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if name in type(fn).__name__:
            return fn
        stack.extend(f for f, _ in fn.next_functions)
    return None


def run_case(case: Case, card: Card = Card(), *, keep_going: bool = False) -> Result:
    """Run one case in the fake CUDA world and check it; never raises (failures are in the result).
    ``keep_going``: a failed launch check is recorded and the run goes on (else the case stops there)."""
    res = Result(case)
    t0 = time.perf_counter()
    try:
        _run_case(case, card, res, keep_going)
    except Exception as exc:  # noqa: BLE001 - reported as the case's failure
        import traceback

        res.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        res.failures.append(f"raised {res.error}")
        res.traceback = traceback.format_exc()
    res.seconds = time.perf_counter() - t0
    res.ok = not res.failures
    return res


def _run_case(case: Case, card: Card, res: Result, keep_going: bool) -> None:
    from alphadpo_kernels import FusedAlphaDPOLoss, LogpsOptions, fused_alpha_dpo_loss, fused_sequence_logps
    from alphadpo_kernels.ops.sequence_logps.instrument import count_gemm_work

    try:  # the host-sync counter (instrument.count_host_syncs)
        from alphadpo_kernels.ops.sequence_logps.instrument import count_host_syncs
    except ImportError:  # not there yet: syncs are not counted
        count_host_syncs = None

    shift = case.what != "op"
    labels_cpu, cu_cpu = _labels(case)
    n, h, v = case.n_tok, case.hdim, case.vocab
    n_live = res.n_live = _n_live(case, labels_cpu, cu_cpu, shift)
    w_dtype = torch.float32 if case.head == "fp32" else torch.bfloat16
    opts = LogpsOptions(memory=case.memory, filter_eps="auto" if case.filter else None)
    floor = res.floor = n * h * 2 + v * h * w_dtype.itemsize + (v * w_dtype.itemsize if case.bias else 0)
    if case.memory == "fast":
        res.bound = floor + 4 * min(n_live, v) * h + 64 * MiB
    else:
        res.bound = 1.10 * floor
    dev = torch.device(case.device)
    pairs = 2
    refs_cpu = [torch.full((pairs,), -1.5 - i) for i in range(2)]

    with fake_cuda_world(card) as (fake_mode, shadows, rec, fake_cuda), fake_mode, shadows:
        rec.strict = not keep_going
        if case.layout != "packed":
            hidden = torch.empty(4, n // 4, h, dtype=torch.bfloat16, device=dev)
        else:
            hidden = torch.empty(n, h, dtype=torch.bfloat16, device=dev)
        weight = torch.empty(v, h, dtype=w_dtype, device=dev)
        hidden.requires_grad_(), weight.requires_grad_()
        bias = torch.empty(v, dtype=w_dtype, device=dev, requires_grad=True) if case.bias else None
        softcap = 30.0 if case.bias else None
        labels = shadows.attach(torch.empty(labels_cpu.shape, dtype=labels_cpu.dtype, device=dev), labels_cpu)
        cu = shadows.attach(torch.empty(cu_cpu.shape, dtype=cu_cpu.dtype, device=dev), cu_cpu) \
            if cu_cpu is not None else None
        refs = [shadows.attach(torch.empty(pairs, device=dev), r) for r in refs_cpu]
        if case.what == "loss":
            loss_fn = FusedAlphaDPOLoss(shift=True, options=opts).to(dev)
        if case.what == "lossfn":  # the reference model's head: same shapes and dtypes, no grad
            ref_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev)
            ref_weight = torch.empty(weight.shape, dtype=weight.dtype, device=dev)

        def forward():
            if case.what == "op":
                return fused_sequence_logps(hidden, weight, labels, bias=bias, softcap=softcap, cu_seqlens=cu,
                                            backend=case.backend, options=opts).sum()
            if case.what == "lossfn":
                return fused_alpha_dpo_loss(hidden, weight, labels, cu_seqlens=cu, ref_hidden=ref_hidden,
                                            ref_weight=ref_weight, shift=True, backend=case.backend,
                                            options=opts).loss
            return loss_fn(hidden, weight, labels, cu_seqlens=cu, ref_chosen_logps=refs[0],
                           ref_rejected_logps=refs[1], backend=case.backend).loss

        syncs = count_host_syncs() if count_host_syncs else contextlib.nullcontext(None)
        with count_gemm_work() as fwd_log, TorchGemmFlops() as fwd_flops, LiveBytes() as fwd_mem, \
                syncs as fwd_sync:
            root = forward()
        res.fwd_peak, res.fwd_largest = fwd_mem.peak, fwd_mem.largest[1]
        res.fwd_syncs = list(fwd_sync.ops) if fwd_sync is not None else ["(count_host_syncs missing)"]
        node = _find_node(root, "_SequenceLogps")
        _expect(node is not None, "no _SequenceLogps node in the graph")
        w_key = storage_key(weight)
        for t in node.saved_tensors:
            if t is not None and t.numel() * 2 >= v * h and storage_key(t) != w_key and t.shape[0] == v:
                res.failures.append(f"the forward saved a weight-sized tensor for the backward: {describe(t)}")
        if fwd_mem.largest[0] >= v * h * 2:
            res.failures.append(f"the forward allocated a weight-sized tensor: {fwd_mem.largest[1]}")
        del node

        syncs = count_host_syncs() if count_host_syncs else contextlib.nullcontext(None)
        with count_gemm_work() as bwd_log, TorchGemmFlops() as torch_flops, LiveBytes() as bwd_mem, syncs as bwd_sync:
            run_backward(root)
            del root
        res.bwd_peak, res.bwd_largest = bwd_mem.peak, bwd_mem.largest[1]
        res.bwd_syncs = list(bwd_sync.ops) if bwd_sync is not None else ["(count_host_syncs missing)"]
        for leaf, name in ((hidden, "hidden"), (weight, "weight"), (bias, "bias")):
            if leaf is None:
                continue
            if leaf.grad is None:
                res.failures.append(f"{name}.grad is None after the backward")
            elif (leaf.grad.dtype, tuple(leaf.grad.shape)) != (leaf.dtype, tuple(leaf.shape)):
                res.failures.append(f"{name}.grad is {describe(leaf.grad)} for {describe(leaf)}")

    res.gemms = {**fwd_flops.signatures}
    for k, c in torch_flops.signatures.items():
        res.gemms[k] = res.gemms.get(k, 0) + c
    for sig in res.gemms:  # tensor-core operands only: no float32 upcast of a bf16 operand on the GPU path
        if "float32 x" in sig or "x float32" in sig:
            res.failures.append(f"a GEMM with a float32 operand on the bf16 path: {sig} (the upcast fallback, or a "
                                "float32 head not rounded to the hidden states' dtype)")
    fwd_own = fwd_log.flops - fwd_log.flops_of("triton:")
    if fwd_own != fwd_flops.flops:
        res.failures.append(f"the forward's torch GEMMs ({fwd_flops.flops:.3e} flops) are not what its accounting "
                            f"records ({fwd_own:.3e})")
    unit = 2 * n_live * v * h
    res.fwd_units, res.bwd_units = fwd_log.flops / unit, bwd_log.flops / unit
    own = bwd_log.flops - bwd_log.flops_of("triton:")
    if own != torch_flops.flops:
        res.failures.append(f"the backward's torch GEMMs ({torch_flops.flops:.3e} flops) are not what its accounting "
                            f"records ({own:.3e})")
    want_bwd = 3 if case.memory == "fast" else 4
    if case.filter:
        want_bwd = None  # the skipping kernel's work depends on the values
    if want_bwd is not None and abs(res.bwd_units - want_bwd) > 1e-9:
        res.failures.append(f"backward GEMM units {res.bwd_units:.3f} != {want_bwd} ({case.memory})")
    forwards = 2 if case.what == "lossfn" else 1  # the reference head's forward (under no_grad) as well
    if not (forwards - 1e-9 <= res.fwd_units <= forwards * n / n_live + 1e-9):
        res.failures.append(f"forward GEMM units {res.fwd_units:.3f} outside [{forwards}, {forwards}·N/N_live = "
                            f"{forwards * n / n_live:.3f}]")
    if res.bwd_peak > res.bound:
        res.failures.append(f"backward peak {res.bwd_peak / GiB:.3f} GiB > bound {res.bound / GiB:.3f} GiB "
                            f"({case.memory}); largest allocation: {res.bwd_largest}")
    # host syncs: README documents one for the value checks (a call with check_values=True) and one in the
    # backward (the number of live tokens); each cuBLAS forward's live-row gather (nonzero) reads it once more
    if count_host_syncs is not None:
        want_fwd = 1 + forwards * (case.backend == "cublas")
        if len(res.fwd_syncs) > want_fwd:
            res.failures.append(f"forward made {len(res.fwd_syncs)} host syncs (documented {want_fwd}): "
                                f"{res.fwd_syncs}")
        if len(res.bwd_syncs) > 1:
            res.failures.append(f"backward made {len(res.bwd_syncs)} host syncs (documented 1): {res.bwd_syncs}")
    res.failures += [f"launch check: {e}" for e in rec.errors]
    res.launches = len(rec.launches)
    res.launch_log = rec.launches
    kinds: dict = {}
    for ln in rec.launches:
        kinds[ln.kernel] = kinds.get(ln.kernel, 0) + 1
    res.launch_kinds = kinds
    if res.launches == 0:
        res.failures.append("no kernel launch was recorded")


# ------------------------------------------------------------------------------------------------- case lists


def all_cases() -> list[Case]:
    out = []
    for what, n_tok, layout, memory, backend, head in itertools.product(
            ("op", "loss"), (8 * K, 16 * K, 64 * K), ("padded", "packed"), ("fast", "lean"), ("triton", "cublas"),
            ("bf16", "fp32")):
        out.append(Case(what, n_tok, layout, memory, backend, head))
    out.append(Case("op", 16 * K, "padded", "fast", "triton", "bf16", device="cuda:1"))
    out.append(Case("op", 16 * K, "packed", "lean", "cublas", "fp32", device="cuda:1"))
    out.append(Case("loss", 16 * K, "packed", "fast", "triton", "bf16", device="cuda:1"))
    for layout, memory, backend, head in (("padded", "fast", "triton", "bf16"), ("packed", "lean", "triton", "fp32"),
                                           ("packed", "fast", "cublas", "bf16"), ("padded", "lean", "cublas", "fp32")):
        out.append(Case("lossfn", 16 * K, layout, memory, backend, head))
    for n_tok, memory in itertools.product((8 * K, 16 * K, 64 * K), ("fast", "lean")):
        out.append(Case("op", n_tok, "dense", memory, "triton", "bf16"))
    for backend, memory, head in (("triton", "fast", "bf16"), ("triton", "lean", "fp32"), ("cublas", "fast", "fp32"),
                                  ("cublas", "lean", "bf16")):
        out.append(Case("op", 16 * K, "padded", memory, backend, head, bias=True))
    out.append(Case("op", 16 * K, "padded", "fast", "triton", "bf16", filter=True))
    out.append(Case("op", 64 * K, "padded", "fast", "triton", "bf16", filter=True))
    return out


def quick_cases() -> list[Case]:
    """What tests/test_cuda_dryrun.py runs: every axis at least once, each N once per memory mode."""
    c = Case
    return [
        c("op", 8 * K, "padded", "fast", "triton", "bf16"),
        c("op", 16 * K, "packed", "lean", "triton", "bf16"),
        c("op", 64 * K, "padded", "lean", "triton", "bf16"),
        c("op", 64 * K, "packed", "fast", "cublas", "bf16"),
        c("op", 16 * K, "padded", "fast", "cublas", "bf16"),
        c("loss", 16 * K, "packed", "fast", "triton", "bf16"),
        c("loss", 8 * K, "padded", "lean", "cublas", "bf16"),
        c("op", 16 * K, "padded", "fast", "triton", "fp32"),
        c("op", 16 * K, "padded", "lean", "triton", "fp32"),
        c("op", 16 * K, "packed", "fast", "cublas", "fp32"),
        c("loss", 16 * K, "padded", "lean", "cublas", "fp32"),
        c("lossfn", 16 * K, "packed", "fast", "triton", "bf16"),
        c("lossfn", 8 * K, "padded", "lean", "cublas", "fp32"),
        c("op", 16 * K, "padded", "fast", "triton", "bf16", device="cuda:1"),
        c("op", 16 * K, "padded", "lean", "triton", "fp32", bias=True),
        c("op", 8 * K, "packed", "lean", "cublas", "bf16", device="cuda:1"),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the cases the tests run")
    p.add_argument("-k", action="append", default=[], help="run cases whose id contains this (repeatable: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each failure's traceback, syncs and GEMMs")
    p.add_argument("--keep-going", action="store_true",
                   help="record a failed launch check and go on (default: the case stops at the first)")
    p.add_argument("--show-launches", type=int, default=0, metavar="N",
                   help="print the first N checked launches of each case (kernel, grid, device, tensor arguments)")
    args = p.parse_args(argv)
    cases = quick_cases() if args.quick else all_cases()
    cases = [c for c in cases if all(k in c.id for k in args.k)]
    print(f"CUDA dry run on a fake {Card().name} (sm_{Card().major}{Card().minor}, {Card().multi_processor_count} "
          f"SMs), H={HDIM}, V={VOCAB}, bf16 hidden; {len(cases)} cases. Peaks in GiB (bound: fast F + 4·min(N,V)·H "
          "+ 64 MiB, lean 1.10·F); units = forward+backward GEMM units of N_live·V·H; sync = host syncs fwd/bwd")
    print(HEADER)
    failed = 0
    for case in cases:
        res = run_case(case, keep_going=args.keep_going)
        print(res.row(), flush=True)
        if not res.ok:
            failed += 1
            for f in res.failures:
                print(f"    - {f}")
            if args.verbose and getattr(res, "traceback", None):
                print(res.traceback)
        for line in res.launch_lines(args.show_launches):
            print(line)
        if args.verbose:
            print(f"    syncs fwd {res.fwd_syncs} bwd {res.bwd_syncs}")
            print(f"    GEMMs {res.gemms}")
    print(f"{len(cases) - failed}/{len(cases)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
