"""Compile every shipped Triton kernel and block configuration for real cards, with no GPU.

    python benchmarks/compile_check.py                      # the shipped set, a table, non-zero exit on a failure
    python benchmarks/compile_check.py --json out.json --candidates --archs 90

Triton compiles ahead of time for a named target with its own toolchain (the bundled ptxas); this script
specialises each kernel as a launch at the Llama-3-8B head would (pointers and sizes divisible by 16, unit
strides as constants), then reads off the result:

* ``regs`` / ``spill_bytes``: ``ptxas -v`` on the kernel's PTX, with the flags Triton itself passes;
* ``smem_bytes``: Triton's dynamic shared memory, against the card's per-block limit;
* ``tensor_cores``: ``HGMMA`` (wgmma, sm_90) or ``HMMA`` (mma, sm_80) in the SASS (``cuobjdump``);
* ``atomics``: the PTX atomic / reduction instructions and their memory semantics;
* ``programs`` / ``hbm_gb``: the launch grid at the Llama-3-8B head (N = 16k tokens) and the HBM bytes that grid
  must stream there under a stated L2 model (:func:`traffic`): a block stays in L2 while the programs of one
  group (``GROUP_M`` row blocks × the columns they sweep, about one wave) use it, and nothing survives from one
  group to the next. It makes a grid's shape visible without a card: the forward reads each hidden block about
  once and the whole head once per group of ``BLOCK_M·GROUP_M`` tokens.

The shipped set: the kernels (forward and its split merge, the backward's dz producer, the opt-in tile-skipping
backward) at every per-architecture starting point (tuning.ARCH_DEFAULTS, what runs when no block sizes are
given), in bf16 / fp16 / fp32 and bf16 hidden states with a float32 master head (``bf16+w32``), with and without
bias + soft-cap; ``--candidates`` adds each kernel's autotuner candidates (bf16, plain and float32 master head).
A row fails on a compile error, shared memory over the card's limit, an ``acq_rel`` atomic, or (bf16 / fp16,
float32 master head included, at a starting point on its own architecture, and every candidate) any spill.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHS = (80, 90)
# Largest dynamic shared memory a block may opt into (CUDA programming guide, compute capability tables).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # the same figures as tuning.SMEM_LIMIT
# dtype name -> (hidden states' pointer type, weight's pointer type)
DTYPES = {"bf16": ("bf16", "bf16"), "fp16": ("fp16", "fp16"), "fp32": ("fp32", "fp32"),
          "bf16+w32": ("bf16", "fp32")}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
SMS = 132  # an H100 / H200: the forward's default split count is derived from it
VARIANTS = {"plain": dict(HAS_BIAS=False, HAS_SOFTCAP=False), "bias+softcap": dict(HAS_BIAS=True, HAS_SOFTCAP=True)}
# Sizes a launch at the Llama-3-8B head sees (16k tokens, H = 4096, V = 128256, 2048-column dz chunks).
HEAD = dict(N=16384, M=16384, V=128256, VC=2048, V_OFFSET=2048, H=4096, stride_hn=4096, stride_hm=4096,
            stride_wv=4096, stride_dzm=2048, TILES_PER_SPLIT=63, SPLITS=16)
UNIT_STRIDES = ("stride_hk", "stride_wk")
F32_POINTERS = ("lse_ptr", "logp_ptr", "g_ptr", "dh_ptr", "dw_ptr", "db_ptr", "dbp_ptr", "part_ptr")
WEIGHT_POINTERS = ("w_ptr",)


@dataclass
class Row:
    kernel: str
    config: str
    dtype: str
    variant: str
    arch: int
    ok: bool = False
    regs: int | None = None
    spill_bytes: int | None = None
    smem_bytes: int | None = None
    smem_limit: int = 0
    tensor_cores: str = ""  # "HGMMA" | "HMMA" | "" (none)
    atomics: str = "none"  # "none" | "relaxed×N" | "acq_rel×N"
    programs: int = 0  # launch grid at the Llama-3 head, N = 16k (the dz producer: per 2048-column chunk)
    hbm_gb: float = 0.0  # HBM traffic of that use at the head under the L2 model of traffic()
    must_not_spill: bool = False
    seconds: float = 0.0
    error: str = ""

    @property
    def failures(self) -> list[str]:
        out = []
        if not self.ok:
            out.append(f"compile error: {self.error}")
            return out
        if self.smem_bytes is not None and self.smem_bytes > self.smem_limit:
            out.append(f"shared memory {self.smem_bytes} B > {self.smem_limit} B")
        if "acq_rel" in self.atomics:
            out.append(f"acq_rel atomics ({self.atomics})")
        if self.must_not_spill and self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        return out


def kernels():
    """name -> (kernel, LogpsOptions -> its launch constexprs, num_warps and num_stages as the launcher derives
    them, fixed flags, the option prefix of the configuration it uses or None)."""
    from alphadpo_kernels.ops.sequence_logps import triton_forward, triton_grad_logits, triton_skip_backward

    from alphadpo_kernels.ops.sequence_logps.tuning import fit_stages

    def fwd(o, dtype, arch):
        e_h, e_w = (ITEMSIZE[t] for t in DTYPES[dtype])
        return dict(BLOCK_M=o.fwd_block_m, BLOCK_N=o.fwd_block_n, BLOCK_K=o.fwd_block_k, GROUP_M=o.fwd_group_m,
                    num_warps=o.fwd_num_warps, num_stages=fit_stages(o.fwd_num_stages, o.fwd_block_m, o.fwd_block_n,
                                                                      o.fwd_block_k, e_h, e_w, arch // 10))

    def merge(o, dtype, arch):
        return dict(BLOCK=triton_forward.MERGE_BLOCK, num_warps=4, num_stages=1)

    def bwd(o, dtype, arch):
        return dict(BLOCK_M=o.bwd_block_m, BLOCK_N=o.bwd_block_n, BLOCK_K=o.bwd_block_k, GROUP_M=o.bwd_group_m,
                    num_warps=o.bwd_num_warps, num_stages=o.bwd_num_stages)

    def skip(o, dtype, arch):
        e_h, e_w = (ITEMSIZE[t] for t in DTYPES[dtype])
        return triton_skip_backward.skip_tiles(o, e_h, e_w, arch // 10)

    return {
        "forward": (triton_forward._sequence_logps_fwd_kernel, fwd, {}, "fwd"),
        "merge_splits": (triton_forward._merge_splits_kernel, merge, {}, None),
        "grad_logits": (triton_grad_logits._grad_logits_kernel, bwd, dict(NEED_DB=None), "bwd"),
        "skip_backward": (triton_skip_backward._skip_backward_kernel, skip,
                          dict(FILTER=True, COUNT_SKIPS=False, NEED_DH=True, NEED_DW=True, NEED_DB=None), "bwd"),
    }


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def traffic(kernel_name: str, launch: dict, dtype: str, n: int = HEAD["N"], vocab: int = HEAD["V"],
            hdim: int = HEAD["H"], chunk: int = HEAD["VC"], sms: int = SMS) -> tuple[int, float]:
    """``(programs, HBM GB)`` of one use of the kernel at the head: the whole forward; the dz producer over one
    vocabulary pass in ``chunk``-column launches (the programs column is per launch); the skip kernel over the
    whole vocabulary. L2 model: a block stays in L2 while the programs of its group use it (``GROUP_M`` row
    blocks × every column the group sweeps: one wave, or a few), and nothing survives between groups. Under it a
    group streams each of its hidden blocks once and each weight tile it touches once. Atomic adds (skip) are
    counted as a read and a write each, as if L2 held nothing: the upper bound the shape allows."""
    from alphadpo_kernels.ops.sequence_logps.triton_forward import MIN_TILES_PER_SPLIT

    e_h, e_w = ITEMSIZE[DTYPES[dtype][0]], ITEMSIZE[DTYPES[dtype][1]]
    if kernel_name == "merge_splits":
        return _cdiv(n, launch["BLOCK"]), (12 * HEAD["SPLITS"] * n + 8 * n + 8 * n) / 1e9
    bm, bn, group = launch["BLOCK_M"], launch["BLOCK_N"], launch["GROUP_M"]
    row_blocks = _cdiv(n, bm)
    groups = _cdiv(row_blocks, group)
    if kernel_name == "forward":  # the launcher's default split count (triton_forward.plan_splits)
        tiles = _cdiv(vocab, bn)
        splits = min(max(sms // max(1, min(group, row_blocks)), _cdiv(2 * sms, row_blocks)),
                     max(1, tiles // MIN_TILES_PER_SPLIT))
        splits = _cdiv(tiles, _cdiv(tiles, splits))
        programs = row_blocks * splits
        bytes_ = n * hdim * e_h + groups * vocab * hdim * e_w + 12 * splits * n + 8 * n
        return programs, bytes_ / 1e9
    if kernel_name == "grad_logits":
        launches = _cdiv(vocab, chunk)
        programs = row_blocks * _cdiv(chunk, bn)
        bytes_ = launches * n * hdim * e_h + groups * vocab * hdim * e_w + n * vocab * e_h + 12 * n * launches
        return programs, bytes_ / 1e9
    # skip_backward: recompute reads like the dz producer with whole-vocabulary launches, plus the atomics
    programs = row_blocks * _cdiv(vocab, bn)
    atomics = 4 * 2 * programs * (bm + bn) * hdim
    bytes_ = n * hdim * e_h + groups * vocab * hdim * e_w + atomics
    return programs, bytes_ / 1e9


def configs(with_candidates: bool) -> dict[str, tuple[dict, int | None, str | None]]:
    """name -> (LogpsOptions fields, the architecture it is the starting point of or None, and for a candidate the
    kernel prefix it configures: ``fwd`` or ``bwd``)."""
    from alphadpo_kernels.ops.sequence_logps import tuning

    out = {f"start-sm{major}0": (fields, major * 10, None) for major, fields in tuning.ARCH_DEFAULTS.items()}
    if with_candidates:
        for major, per_kernel in tuning.CANDIDATES.items():
            for kernel, prefix in (("forward", "fwd"), ("backward", "bwd")):
                for i, fields in enumerate(per_kernel[kernel]):
                    out[f"{prefix}-cand{i}-sm{major}0"] = (dict(tuning.ARCH_DEFAULTS[major], **fields), major * 10,
                                                           prefix)
    return out


def _ptxas_stats(ptx: str, arch: int, enable_fp_fusion: bool = True) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", *([] if enable_fp_fusion else
               ["--fmad=false"]), f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def _sass_tensor_cores(cubin: bytes) -> str:
    from triton.backends.nvidia.compiler import knobs

    tool = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    for op in ("HGMMA", "HMMA"):
        if re.search(rf"\b{op}\.", sass):
            return op
    return ""


def _atomics(ptx: str) -> str:
    ops = re.findall(r"^\s*(?:@%p\d+\s+)?((?:atom|red)\.[\w.]+)", ptx, re.M)
    if not ops:
        return "none"
    strong = [op for op in ops if re.search(r"\.(acq_rel|acquire|release|sc)\b", op)]
    if strong:
        return f"acq_rel×{len(strong)}"
    return f"relaxed×{len(ops)}"


def compile_one(kernel_name: str, config: str, fields: dict, dtype: str, variant: str, arch: int,
                must_not_spill: bool) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from alphadpo_kernels.ops.sequence_logps.options import LogpsOptions

    row = Row(kernel_name, config, dtype, variant, arch, smem_limit=SMEM_LIMIT[arch], must_not_spill=must_not_spill)
    start = time.time()
    try:
        kernel, blocks, extra, _ = kernels()[kernel_name]
        fn = kernel  # a JITFunction: workers import Triton with the interpreter off
        opts = dataclasses.replace(LogpsOptions(), **fields)
        launch = blocks(opts, dtype, arch)
        row.programs, row.hbm_gb = traffic(kernel_name, launch, dtype)
        row.hbm_gb = round(row.hbm_gb, 2)
        num_stages, num_warps = launch.pop("num_stages"), launch.pop("num_warps")
        constexprs = dict(launch, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST_DOT=False,
                          **VARIANTS[variant])
        constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
        constexprs.update({k: (v if v is not None else VARIANTS[variant]["HAS_BIAS"]) for k, v in extra.items()})
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs or name in UNIT_STRIDES:
                signature[name] = "constexpr"
                constexprs.setdefault(name, 1)
            elif name.endswith("_ptr"):
                kind = ("i32" if name == "skip_count_ptr" else "i64" if name == "tgt_ptr"
                        else "fp32" if name in F32_POINTERS else DTYPES[dtype][1] if name in WEIGHT_POINTERS
                        else DTYPES[dtype][0])
                signature[name] = "*" + kind
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name in ("softcap", "logit_scale", "filter_eps"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if HEAD.get(name, 1) % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        row.smem_bytes = int(compiled.metadata.shared)
        row.regs, row.spill_bytes = _ptxas_stats(compiled.asm["ptx"], arch)
        row.tensor_cores = _sass_tensor_cores(compiled.asm["cubin"])
        row.atomics = _atomics(compiled.asm["ptx"])
        row.ok = True
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    row.seconds = round(time.time() - start, 2)
    return row


def jobs(archs=ARCHS, with_candidates=False, dtypes=tuple(DTYPES), variants=tuple(VARIANTS)):
    """The (kernel, config, fields, dtype, variant, arch, must_not_spill) tuples to compile."""
    out = []
    table = kernels()
    for config, (fields, home_arch, prefix) in configs(with_candidates).items():
        for arch in archs:
            if home_arch is not None and home_arch != arch:
                continue  # a starting point is only ever used on its own architecture
            for kernel_name, (_, _, _, kernel_prefix) in table.items():
                if prefix is not None and kernel_prefix != prefix:
                    continue  # a candidate configures one kernel: the others are compiled at their starts
                if kernel_name == "merge_splits":  # no tiles, no dtype: once per architecture
                    if prefix is None:
                        out.append((kernel_name, config, fields, "fp32", "plain", arch, True))
                    continue
                for dtype in dtypes:
                    if kernel_name == "grad_logits" and dtype == "bf16+w32":
                        continue  # the backward driver hands the dz kernel weight chunks already rounded
                    for variant in variants:
                        if prefix is not None and (dtype not in ("bf16", "bf16+w32") or variant != "plain"):
                            continue
                        must_not_spill = dtype != "fp32"
                        out.append((kernel_name, config, fields, dtype, variant, arch, must_not_spill))
    return out


def _worker_init() -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # real compilation, whatever the parent runs under (the tests interpret)


def run(job_list, workers: int | None = None) -> list[Row]:
    """Compile in fresh processes (spawned: Triton must be imported with the interpreter off)."""
    import multiprocessing

    workers = workers or min(4, os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_worker_init) as pool:
        return list(pool.map(compile_one, *zip(*job_list)))


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Triton kernels compiled ahead of time (no GPU)")
    for col in ("kernel", "config", "dtype", "variant", "arch", "ok", "regs", "spill B", "smem KB", "tensor cores",
                "atomics", "programs", "HBM GB", "s", "failures"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.kernel, r.config, r.dtype, r.variant, f"sm_{r.arch}", "yes" if r.ok else "NO", str(r.regs),
                      str(r.spill_bytes), f"{(r.smem_bytes or 0) / 1024:.0f}", r.tensor_cores or "-", r.atomics,
                      str(r.programs), f"{r.hbm_gb:.1f}", f"{r.seconds:.1f}", "; ".join(r.failures))
    Console(width=220).print(table)


def markdown(rows: list[dict]) -> str:
    """The per-architecture starting points (every kernel, dtype and variant) as a markdown table, and a line
    per candidate set, from the rows ``--json`` writes."""
    head = ("| kernel | config | dtype | variant | arch | regs | spill B | smem KB | tensor cores | atomics | programs "
            "(N = 16k) | HBM GB (L2 model) |\n| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    lines = [head]
    for r in rows:
        if r["config"].startswith("start"):
            lines.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['variant']} | sm_{r['arch']} | {r['regs']} "
                         f"| {r['spill_bytes']} | {(r['smem_bytes'] or 0) / 1024:.0f} | {r['tensor_cores'] or '—'} "
                         f"| {r['atomics']} | {r['programs']} | {r['hbm_gb']:.1f} |")
    cands = [r for r in rows if not r["config"].startswith("start")]
    if cands:
        worst = max(cands, key=lambda r: r["smem_bytes"] or 0)
        lines.append("")
        lines.append(f"Autotuner candidates: {len({r['config'] for r in cands})} configurations, {len(cands)} compiles "
                     f"(bf16 and a float32 master head, each on its own architecture): "
                     f"{sum(1 for r in cands if r['failures'])} failing, {sum(1 for r in cands if r['spill_bytes'])} "
                     f"spilling; largest shared memory {(worst['smem_bytes'] or 0) / 1024:.0f} KB "
                     f"({worst['kernel']} {worst['config']} {worst['dtype']}).")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--candidates", action="store_true", help="also the autotuner's candidate configurations")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--workers", type=int)
    p.add_argument("--markdown", metavar="JSON", help="print the results table of a --json file as markdown, and exit")
    args = p.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return 0
    started = time.time()
    rows = run(jobs(tuple(args.archs), args.candidates), args.workers)
    print_table(rows)
    failed = [r for r in rows if r.failures]
    print(f"{len(rows)} compiles, {len(failed)} failing, {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"failures": r.failures} for r in rows], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
