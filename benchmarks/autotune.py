"""Autotune the Triton kernels' launch configurations on this GPU at the Llama-3-8B head and cache the winners.

    ALPHADPO_TUNING_CACHE=out/tuning.json python benchmarks/autotune.py [--tokens 16384] [--dtype bf16]

Each kernel is timed on its own: the forward (split-vocabulary kernel + merge) and the backward's dz producer.
Prints every candidate's median time (CUDA events) or why it was dropped; the cache is then used by
fused_sequence_logps (and so by bench_loss.py) whenever no options are passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alphadpo_kernels.ops.sequence_logps import tuning  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--V", type=int, default=128256)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("autotune: no CUDA device, skipped")
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, args.tokens // 2, args.H, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(args.V, args.H, device="cuda", generator=g) * args.H ** -0.5).to(dtype)
    labels = torch.randint(0, args.V, (2, args.tokens // 2), device="cuda", generator=g)
    record = tuning.autotune(hidden, weight, labels, repeats=args.repeats)
    for kernel, rows in record["results"].items():
        for r in rows:
            print(f"{kernel:9s}", ("%8.2f ms  " % r["ms"]) if "ms" in r else "  dropped   ", r["options"],
                  r.get("error", ""))
    ms = ", ".join(f"{k} {v:.2f} ms" for k, v in record["ms"].items())
    print(f"best for {record['key']}: {ms} {json.dumps(record['options'])} -> {tuning.cache_path()}")
    return record


if __name__ == "__main__":
    main()
