"""The command lines as a user meets them: help for every flag, no abbreviations, user errors in one line with
exit status 2 (not a traceback), no silent reuse of an output folder; the benchmark's own errors and help."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from alphadpo_kernels.train.config import TrainConfig, build_parser  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "alphadpo_kernels.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    return proc.returncode, proc.stderr.strip().splitlines()


def test_every_flag_has_help_and_the_closed_sets_have_choices():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        action = actions[f.name]
        assert action.help and len(action.help) > 10, f.name
        assert action.option_strings == ["--" + f.name.replace("_", "-")]
    assert actions["loss_type"].choices == ("alpha_dpo", "simpo", "sigmoid", "ipo")
    assert actions["mixed_precision"].choices == ("no", "bf16", "fp16")
    text = parser.format_help()
    assert "--learning-rate" in text and "(default: 1e-06)" in text and "--padding-free {true,false}" in text


@pytest.mark.parametrize("args,first_line", [
    (["--demo", "--learning-rat", "1e-3"], "alphadpo-train: error: unrecognized arguments: --learning-rat"),
    (["--demo", "--loss-type", "dpo2"], "alphadpo-train: error: argument --loss-type: invalid choice: 'dpo2'"),
    (["--demo", "--gradient-checkpointing", "ture"], "alphadpo-train: error: argument --gradient-checkpointing: "
                                                     "expected true or false, got 'ture'"),
    (["--demo", "--beta", "two"], "alphadpo-train: error: argument --beta: invalid float value: 'two'"),
    (["missing.yaml"], "alphadpo-train: error: config file 'missing.yaml' does not exist"),
    (["--train-file", "missing.jsonl", "--model-name-or-path", "x"],
     "alphadpo-train: error: train_file 'missing.jsonl' does not exist"),
    (["--demo", "--weights-dtype", "bf16"], "alphadpo-train: error: weights_dtype='bf16' needs optimizer='adamw_kahan'"),
    (["--demo", "--max-prompt-length", "60"], "alphadpo-train: error: max_prompt_length (60) must be below max_length"),
])
def test_user_errors_are_one_line_and_exit_2(args, first_line, tmp_path):
    code, lines = _cli(*args, cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(first_line), lines


@pytest.mark.parametrize("content,first_line", [
    ("learning_rat: 1.0e-3\n", "unknown keys in"),
    ("beta: [1, 2\n", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping of TrainConfig keys"),
])
def test_bad_yaml_is_one_line(tmp_path, content, first_line):
    (tmp_path / "c.yaml").write_text(content)
    code, lines = _cli(str(tmp_path / "c.yaml"), "--demo", cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and first_line in lines[0], lines


def test_an_output_folder_is_never_reused_silently(tmp_path):
    out = str(tmp_path / "run")
    quick = ["--demo", "--max-steps", "2", "--eval-steps", "100", "--save-steps", "1", "--output-dir", out]
    assert _cli(*quick)[0] == 0
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    code, lines = _cli(*quick)
    assert code == 2 and "holds a previous run" in lines[0] and "--overwrite true" in lines[0]
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics  # neither appended nor overwritten
    assert _cli(*quick, "--overwrite", "true")[0] == 0
    assert open(os.path.join(out, "metrics.jsonl")).read().count('"train/loss"') == metrics.count('"train/loss"')
    code, lines = _cli(*quick[:-2], "--output-dir", str(tmp_path / "empty"), "--resume", "latest")
    assert code == 2 and "no checkpoint-* folder" in lines[0]


def test_benchmark_errors_and_help():
    bench = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_loss.py")]
    proc = subprocess.run(bench + ["--T", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--T values must be at least 2" in proc.stderr
    if not __import__("torch").cuda.is_available():
        proc = subprocess.run(bench + ["--device", "cuda"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "no CUDA device is available here" in proc.stderr
    help_text = subprocess.run(bench + ["--help"], capture_output=True, text=True, timeout=120).stdout
    import re

    flags = set(re.findall(r"^\s{2}(--[\w-]+)", help_text, re.M))
    assert {"--T", "--methods", "--regimes", "--repeats", "--device", "--no-progress", "--budget-mb"} <= flags
    for block in re.split(r"\n(?=\s{2}--)", help_text.split("options:")[1])[1:]:
        assert len(block.split(None, 2)) > 2 or "--help" in block, block  # every flag explains itself


def test_backends_tell_the_interpreter_apart(monkeypatch):
    from alphadpo_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends()["triton_interpreter"] is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends()["triton_interpreter"] is False
