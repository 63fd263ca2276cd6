"""Compile every shipped Triton kernel and block configuration for real cards, with no GPU (SPEC §5).

    python benchmarks/compile_check.py                      # the shipped set, a table, non-zero exit on a failure
    python benchmarks/compile_check.py --json out.json --candidates --archs 90

Triton compiles ahead of time for a named target with its own toolchain (the bundled ptxas); this script
specialises each kernel as a launch at the Llama-3-8B head would (pointers and sizes divisible by 16, unit
strides as constants), then reads off the result:

* ``regs`` / ``spill_bytes``: ``ptxas -v`` on the kernel's PTX, with the flags Triton itself passes;
* ``smem_bytes``: Triton's dynamic shared memory, against the card's per-block limit;
* ``tensor_cores``: ``HGMMA`` (wgmma, sm_90) or ``HMMA`` (mma, sm_80) in the SASS (``cuobjdump``);
* ``atomics``: the PTX atomic / reduction instructions and their memory semantics.

The shipped set: the three kernels (forward, the backward's dz producer, the opt-in tile-skipping backward) at
every per-architecture starting point (tuning.ARCH_DEFAULTS, what runs when no block sizes are given), in
bf16 / fp16 / fp32, with and without bias + soft-cap; ``--candidates`` adds the autotuner's candidates. A row
fails on a compile error, shared memory over the card's limit, an ``acq_rel`` atomic, or (bf16 / fp16 at a
starting point on its own architecture) any spill.
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
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
VARIANTS = {"plain": dict(HAS_BIAS=False, HAS_SOFTCAP=False), "bias+softcap": dict(HAS_BIAS=True, HAS_SOFTCAP=True)}
# Sizes a launch at the Llama-3-8B head sees (16k tokens, H = 4096, V = 128256, 2048-column dz chunks).
HEAD = dict(N=16384, M=16384, V=128256, VC=2048, V_OFFSET=2048, H=4096, stride_hn=4096, stride_hm=4096,
            stride_wv=4096, stride_dzm=2048)
UNIT_STRIDES = ("stride_hk", "stride_wk")
F32_POINTERS = ("lse_ptr", "logp_ptr", "g_ptr", "dh_ptr", "dw_ptr", "db_ptr", "dbp_ptr")


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
    """name -> (kernel, LogpsOptions -> its launch constexprs and num_stages, as the launcher derives them, flags)."""
    from alphadpo_kernels.ops.sequence_logps import triton_forward, triton_grad_logits, triton_skip_backward

    def fwd(o):
        return dict(BLOCK_M=o.fwd_block_m, BLOCK_N=o.fwd_block_n, BLOCK_K=o.fwd_block_k, num_stages=o.num_stages)

    def bwd(o):
        return dict(BLOCK_M=o.bwd_block_m, BLOCK_N=o.bwd_block_n, BLOCK_K=o.bwd_block_k, GROUP_M=o.group_m,
                    num_stages=o.num_stages)

    return {
        "forward": (triton_forward._sequence_logps_fwd_kernel, fwd, {}),
        "grad_logits": (triton_grad_logits._grad_logits_kernel, bwd, dict(NEED_DB=None)),
        "skip_backward": (triton_skip_backward._skip_backward_kernel, triton_skip_backward.skip_tiles,
                          dict(FILTER=True, COUNT_SKIPS=False, NEED_DH=True, NEED_DW=True, NEED_DB=None)),
    }


def configs(with_candidates: bool) -> dict[str, tuple[dict, int | None]]:
    """name -> (LogpsOptions fields, the architecture it is the starting point of, or None)."""
    from alphadpo_kernels.ops.sequence_logps import tuning

    out = {f"start-sm{major}0": (fields, major * 10) for major, fields in tuning.ARCH_DEFAULTS.items()}
    if with_candidates:
        out.update({f"candidate-{i}": (fields, None) for i, fields in enumerate(tuning.CANDIDATES)})
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
        kernel, blocks, extra = kernels()[kernel_name]
        fn = kernel  # a JITFunction: workers import Triton with the interpreter off
        opts = dataclasses.replace(LogpsOptions(), **fields)
        launch = blocks(opts)
        num_stages = launch.pop("num_stages")
        constexprs = dict(launch, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST_DOT=False,
                          **VARIANTS[variant])
        constexprs.update({k: (v if v is not None else VARIANTS[variant]["HAS_BIAS"]) for k, v in extra.items()})
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs or name in UNIT_STRIDES:
                signature[name] = "constexpr"
                constexprs.setdefault(name, 1)
            elif name.endswith("_ptr"):
                kind = ("i32" if name == "skip_count_ptr" else "i64" if name == "tgt_ptr"
                        else "fp32" if name in F32_POINTERS else DTYPES[dtype])
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
                                  options={"num_warps": opts.num_warps, "num_stages": num_stages})
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
    for config, (fields, home_arch) in configs(with_candidates).items():
        for arch in archs:
            if home_arch is not None and home_arch != arch:
                continue  # a starting point is only ever used on its own architecture
            for kernel_name in kernels():
                for dtype in dtypes:
                    for variant in variants:
                        if config.startswith("candidate") and (dtype != "bf16" or variant != "plain"):
                            continue
                        must_not_spill = home_arch == arch and dtype in ("bf16", "fp16")
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
                "atomics", "s", "failures"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.kernel, r.config, r.dtype, r.variant, f"sm_{r.arch}", "yes" if r.ok else "NO", str(r.regs),
                      str(r.spill_bytes), f"{(r.smem_bytes or 0) / 1024:.0f}", r.tensor_cores or "-", r.atomics,
                      f"{r.seconds:.1f}", "; ".join(r.failures))
    Console(width=220).print(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--candidates", action="store_true", help="also the autotuner's candidate configurations")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--workers", type=int)
    args = p.parse_args(argv)
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
