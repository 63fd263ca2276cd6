"""Markdown table from a bench_loss.py JSON file (rows that ran): python benchmarks/render_results.py FILE.json"""

from __future__ import annotations

import json
import sys


def table(rows: list[dict], regimes=("uniform", "peaked"), compact: bool = False) -> str:
    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    if compact:
        out = ["| T | method | ms | × GEMM | peak MB above inputs | × floor (dH + dW) |",
               "| ---: | --- | ---: | ---: | ---: | ---: |"]
    else:
        out = ["| regime | T | N | method | ms | × GEMM | peak MB | × floor | loss Δ vs naive | grad Δ vs naive |",
               "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["status"] != "ok" or r["regime"] not in regimes:
            continue
        if compact:
            out.append(f"| {r['T']} | {r['method']} | {f(r['ms'], '.1f')} | {f(r['time_vs_gemm'], '.2f')} | "
                       f"{f(r['peak_mem_mb'], '.1f')} | {f(r['peak_vs_floor'], '.2f')} |")
        else:
            out.append(f"| {r['regime']} | {r['T']} | {r['N']} | {r['method']} | {f(r['ms'], '.1f')} | "
                       f"{f(r['time_vs_gemm'], '.2f')} | {f(r['peak_mem_mb'], '.1f')} | {f(r['peak_vs_floor'], '.2f')} | "
                       f"{f(r['loss_rel_diff'], '.1e')} | {f(r['grad_rel_diff'], '.1e')} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(json.load(open(sys.argv[1])), compact="--compact" in sys.argv))
