"""Markdown from bench_loss.py rows (a --json list or a --jsonl file): the table of rows that ran, the rows whose
timings were unsteady, then the performance targets of docs/design.md met or missed.

    python benchmarks/render_results.py FILE.json|FILE.jsonl [--compact]
"""

from __future__ import annotations

import json
import os
import sys


def load(path: str) -> list[dict]:
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def targets(rows: list[dict]) -> str:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_loss import Row, performance_targets

    fields = set(Row.__dataclass_fields__)
    verdicts = performance_targets([Row(**{k: v for k, v in r.items() if k in fields}) for r in rows])
    lines = ["| target (docs/design.md) | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in verdicts]
    return "\n".join(lines) if verdicts else "(no row measures a performance target)"


def unsteady(rows: list[dict]) -> str:
    """One line naming the measured rows whose timed runs differ by more than bench_loss.SPREAD_WARN (max / min);
    '' when there are none (rows written before the spread was recorded carry none)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_loss import SPREAD_WARN

    bad = [r for r in rows if r.get("status") == "ok" and (r.get("spread") or 0) > SPREAD_WARN]
    if not bad:
        return ""
    names = ", ".join(f"{r['method']} {r['regime']} T={r['T']} ({r['spread']:.1f}×)" for r in bad)
    return f"Unsteady timings (max / min of the timed runs above {SPREAD_WARN}×; medians unreliable): {names}."


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
    rows = load(sys.argv[1])
    print(table(rows, compact="--compact" in sys.argv))
    print()
    note = unsteady(rows)
    if note:
        print(note)
        print()
    print(targets(rows))
