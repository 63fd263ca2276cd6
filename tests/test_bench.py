"""The benchmark harness at tiny shapes: regimes, skip and OOM handling, the JSON schema, the plot."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_loss  # noqa: E402

TINY = dict(T=16, pairs=1, H=32, V=96, dtype="fp32", device="cpu", repeats=1, warmup=0)


def test_regimes_have_the_entropy_they_claim():
    uni = bench_loss.make_inputs(bench_loss.Case("naive", "uniform", **TINY))
    peak = bench_loss.make_inputs(bench_loss.Case("naive", "peaked", **{**TINY, "T": 64, "V": 512}))
    assert bench_loss.token_entropy(uni[0], uni[1]) > math.log(96) - 1.0  # near uniform
    assert 2.0 < bench_loss.token_entropy(peak[0], peak[1]) < 4.0  # a trained LM's range


def test_uninstalled_or_unsupported_method_is_skipped():
    row = bench_loss.measure(bench_loss.Case("liger", "uniform", **TINY))
    assert row.status == "skipped" and "CUDA" in row.reason
    row = bench_loss.measure(bench_loss.Case("fused", "uniform", **TINY))
    assert row.status == "skipped"


def test_import_error_is_skipped(monkeypatch):
    def broken(method, *args):
        raise ImportError("no module named liger_kernel")

    monkeypatch.setattr(bench_loss, "method_fn", broken)
    row = bench_loss.measure(bench_loss.Case("naive", "uniform", **TINY))
    assert row.status == "skipped" and "not importable" in row.reason


def test_oom_is_reported_and_the_run_goes_on():
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 94.00 GiB")

    bad = bench_loss.measure(bench_loss.Case("naive", "uniform", **TINY), fn=oom)
    assert bad.status == "OOM" and bad.ms is None and "94.00 GiB" in bad.reason
    good = bench_loss.measure(bench_loss.Case("naive", "uniform", **TINY))
    assert good.status == "ok" and good.ms > 0 and good.gemm_ms > 0


def test_correctness_column_compares_with_naive():
    row = bench_loss.measure(bench_loss.Case("fused-torch", "peaked", **TINY, check=True))
    assert row.status == "ok"
    assert row.loss_rel_diff < 1e-5 and row.grad_rel_diff < 1e-4


def test_cli_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "rows.json", tmp_path / "plot.png"
    bench_loss.main(["--T", "8", "16", "--H", "32", "--V", "64", "--repeats", "1", "--warmup", "0",
                     "--methods", "fused-torch", "naive", "liger", "--no-progress",
                     "--json", str(out_json), "--plot", str(out_png)])
    rows = json.loads(out_json.read_text())
    assert len(rows) == 2 * 2 * 3  # regimes × T × methods
    assert {r["method"] for r in rows} == {"fused-torch", "naive", "liger"}
    required = {"method", "regime", "T", "N", "H", "V", "dtype", "device", "ms", "ms_min", "ms_max", "spread",
                "gemm_ms", "peak_mem_mb", "floor_mb", "status"}
    for r in rows:
        assert required <= set(r)
        if r["method"] == "liger":
            assert r["status"] == "skipped"
        else:
            assert r["status"] == "ok", r
            assert r["ms"] > 0 and r["gemm_ms"] > 0 and r["peak_mem_mb"] >= 0 and r["floor_mb"] > 0
            assert r["ms_min"] == r["ms"] == r["ms_max"] and r["spread"] == 1.0  # one timed run
            assert r["N"] == 2 * r["T"] * 2
    assert out_png.stat().st_size > 10_000
    # the run ends by saying what it measured, apart from what it skipped, and where the results went
    out = capsys.readouterr().out.splitlines()
    assert "8 rows measured, 0 failed, 4 skipped (method cannot run here) in" in out[-4]
    assert out[-3] == "timing spread unknown: one timed run per row (--repeats 1)"
    assert out[-2:] == [f"rows written to {out_json}", f"plot written to {out_png}"]


def _row(method="naive", status="ok", times=(1.0,)):
    row = bench_loss.Row(method, "uniform", 16, 64, 32, 96, "fp32", "cpu", 1, status=status)
    if status == "ok":
        row.ms, row.ms_min, row.ms_max = sorted(times)[len(times) // 2], min(times), max(times)
        row.spread = row.ms_max / row.ms_min
    return row


def test_summary_counts_outcomes_and_flags_unsteady_timings():
    rows = [_row(times=(10.0, 10.5, 11.0)), _row("fused-torch", times=(10.0, 12.0, 40.0)),
            _row("cce", status="skipped"), _row("fused", status="skipped"), _row("trl", status="OOM")]
    assert bench_loss.count_rows(rows) == {"measured": 2, "failed": 1, "skipped": 2}
    assert [bench_loss.unsteady(r) for r in rows] == [False, True, False, False, False]
    lines = bench_loss.summary_lines(rows, 3.0, repeats=3, saved={})
    assert lines[0] == "2 rows measured, 1 failed, 2 skipped (method cannot run here) in 3 s"
    assert lines[1] == "timing spread (max / min of 3 runs per row): 1.10–4.00×, median 2.55×"
    assert lines[2].startswith("warning: 1 of 2 measured rows swing more than 1.5×")
    assert lines[3].startswith("results not saved: add --json FILE") and "--plot" in lines[3]
    steady = bench_loss.summary_lines(rows[:1], 1.0, repeats=3, saved={"rows": "r.json"})
    assert not any("warning" in line for line in steady) and steady[-1] == "rows written to r.json"


def test_unsteady_rows_are_marked_in_the_table_and_the_markdown(capsys):
    import render_results

    rows = [_row(times=(10.0, 10.5, 11.0)), _row("fused-torch", times=(10.0, 12.0, 40.0))]
    bench_loss.print_table(rows, "t")
    table = capsys.readouterr().out
    assert "4.00 !" in table and "1.10 !" not in table and "10.0–40.0" in table
    note = render_results.unsteady([dataclasses.asdict(r) for r in rows])
    assert "fused-torch uniform T=16 (4.0×)" in note and "naive" not in note
    assert "SPEC" not in render_results.targets([dataclasses.asdict(r) for r in rows])


def test_help_explains_every_method_and_column(capsys):
    import pytest

    assert set(bench_loss.METHOD_HELP) == set(bench_loss.METHODS)
    with pytest.raises(SystemExit):
        bench_loss.parse_args(["--help"])
    text = capsys.readouterr().out
    methods = text.split("\nmethods:\n")[1].split("\n\noutput columns:\n")
    for method in bench_loss.METHODS:
        assert f"\n  {method} " in "\n" + methods[0], method
    for column in bench_loss.COLUMNS:
        assert f"  {column} " in methods[1], column
    assert "--json FILE" in text and "render_results.py" in text and "SPREAD_WARN" in text  # the docstring, whole


def test_trl_row_computes_the_same_loss():
    """The `trl` method (TRL ≥ 1.15's fused LM head, here through its own torch fallback on the CPU) is the same
    α-DPO loss as naive: the mapping of labels, masks and length normalisation is right."""
    import importlib.util

    try:
        found = importlib.util.find_spec("trl.kernels.chunked_logprob") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        import pytest

        pytest.skip("trl >= 1.15 not installed (CI installs it without its data dependencies)")
    for regime in ("uniform", "peaked"):
        row = bench_loss.measure(bench_loss.Case("trl", regime, **TINY, check=True))
        assert row.status == "ok", row.reason
        assert row.loss_rel_diff < 1e-5 and row.grad_rel_diff < 1e-4


def test_ragged_regime_packs_the_same_loss():
    """fused-torch-packed on ragged rows: fewer decoder tokens, the same loss and gradients as naive (padded)."""
    case = dict(TINY, T=32, pairs=2)
    padded = bench_loss.measure(bench_loss.Case("fused-torch", "ragged", **case))
    packed = bench_loss.measure(bench_loss.Case("fused-torch-packed", "ragged", **case, check=True))
    assert padded.status == packed.status == "ok", (padded.reason, packed.reason)
    assert packed.extra["decoder_tokens"] < padded.extra["decoder_tokens"] == 4 * 32
    assert packed.extra["live_tokens"] == padded.extra["live_tokens"]
    assert packed.loss_rel_diff < 1e-5 and packed.grad_rel_diff < 1e-4


def test_padding_free_trainer_comparison_runs():
    import bench_padding_free

    out = bench_padding_free.main(["--steps", "2"])
    assert out["packed"]["decoder_tokens_per_step"] < out["padded"]["decoder_tokens_per_step"]
    assert out["packed"]["seconds_per_step"] > 0
