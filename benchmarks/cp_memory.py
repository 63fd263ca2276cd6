"""Memory per GPU of the fused head against context length and context-parallel size, computed without a GPU.

    python benchmarks/cp_memory.py [--T 32768 65536 131072] [--cp 1 2 4 8] [--json out.json]

Under context parallelism each of the ``cp`` ranks runs the op on its own ``2·T / cp`` tokens of a preference
pair (chosen + rejected, every token scored) against the whole head, plus one ``[rows, 2]`` all-reduce; so the
per-GPU memory of the head and loss is the op's at ``N = 2·T / cp`` tokens. Each row is the CUDA dry run
(``cuda_dryrun.py``: fake CUDA tensors at the Llama-3-8B head, H = 4096, V = 128256, bf16 hidden states and a
float32 master head, the trainer's default) of the Triton path at that N: peaks of live tensor bytes as the
allocation plan makes them, the backward's including the gradients written into ``.grad``. *Computed*, not
measured: a real caching allocator rounds up and fragments. The decoder's own activations (attention, MLP) are
not included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cuda_dryrun as dry  # noqa: E402

GIB = 2**30


def rows(seq_lens, cps, memories=("fast", "lean"), head="fp32"):
    out = []
    for t in seq_lens:
        for cp in cps:
            n_local = 2 * t // cp
            for memory in memories:
                res = dry.run_case(dry.Case("op", n_local, "dense", memory, "triton", head))
                out.append(dict(T=t, cp=cp, tokens_per_gpu=n_local, memory=memory, head=head,
                                fwd_gib=res.fwd_peak / GIB, bwd_gib=res.bwd_peak / GIB, floor_gib=res.floor / GIB,
                                ok=res.ok, failures=list(res.failures)))
                print(f"T={t:>6} cp={cp} N/GPU={n_local:>6} {memory:4s}: backward peak {res.bwd_peak / GIB:.2f} GiB "
                      f"(floor {res.floor / GIB:.2f}, {res.bwd_peak / res.floor:.2f}x) {'ok' if res.ok else 'FAIL'}",
                      flush=True)
    return out


def markdown(table) -> str:
    lines = ["| tokens per sequence | cp | tokens per GPU | fast: backward peak GiB (× floor) | lean: backward peak GiB (× floor) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    by = {(r["T"], r["cp"], r["memory"]): r for r in table}
    for t, cp in dict.fromkeys((r["T"], r["cp"]) for r in table):
        cells = []
        for memory in ("fast", "lean"):
            r = by.get((t, cp, memory))
            cells.append(f"{r['bwd_gib']:.2f} ({r['bwd_gib'] / r['floor_gib']:.2f})" if r else "—")
        lines.append(f"| {t // 1024}k | {cp} | {2 * t // cp // 1024}k | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[32768, 65536, 131072], help="tokens per sequence")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4, 8], help="context-parallel sizes")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    table = rows(args.T, args.cp)
    print(markdown(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0 if all(r["ok"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
