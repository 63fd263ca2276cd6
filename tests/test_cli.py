"""The command lines as a user meets them: help for every flag, no abbreviations, user errors in one line with
exit status 2 (not a traceback), no silent reuse of an output folder; the benchmark's own errors and help."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from alphadpo_kernels.train.config import TrainConfig, build_parser  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _cli(*args, cwd=None, env=None):
    proc = subprocess.run([sys.executable, "-m", "alphadpo_kernels.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)
    return proc.returncode, proc.stderr.strip().splitlines()


def _no_triton_interpreter() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # conftest turns it on for the kernel tests; a user's shell has it off
    return env


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
    (["--demo", "--beta", "-1"], "alphadpo-train: error: beta must be positive, got -1.0"),
])
def test_user_errors_are_one_line_and_exit_2(args, first_line, tmp_path):
    code, lines = _cli(*args, cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(first_line), lines
    assert os.listdir(tmp_path) == []  # no output folder, no tokenized/ cache left behind


def test_a_backend_this_machine_cannot_run_is_one_line(tmp_path):
    from alphadpo_kernels import backends

    if backends()["triton"]:
        pytest.skip("Triton can run here")
    code, lines = _cli("--demo", "--backend", "triton", "--output-dir", "out", cwd=tmp_path,
                       env=_no_triton_interpreter())
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("alphadpo-train: error: backend 'triton' cannot run: ") and "--backend" in lines[0]
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------- every value checked before any work, in-process

def _run_cli(monkeypatch, capsys, tmp_path, args):
    """``alphadpo-train ARGS`` in this process, in an empty ``tmp_path``, with every step that does work (tokenizer,
    data, model) replaced by a failure: returns (exit status, stderr lines)."""
    from alphadpo_kernels.train import trainer

    def work_started(*a, **k):
        raise AssertionError("work started before every value was checked")

    for name in ("_load_tokenizer", "build_datasets", "_load_policy", "_load_reference"):
        monkeypatch.setattr(trainer, name, work_started)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["alphadpo-train", *args])
    with pytest.raises(SystemExit) as exc:
        trainer.cli()
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args,message", [
    (["--beta", "-1"], "beta must be positive, got -1.0"),
    (["--beta", "nan"], "beta must be a finite number, got nan"),
    (["--learning-rate", "-1e-6"], "learning_rate must be in [0, inf), got -1e-06"),
    (["--learning-rate", "inf"], "learning_rate must be a finite number"),
    (["--ema-momentum", "1"], "ema_momentum must be in [0, 1), got 1.0"),
    (["--label-smoothing", "0.5"], "label_smoothing must be in [0, 0.5)"),
    (["--loss-type", "ipo", "--label-smoothing", "0.1"], "label_smoothing applies to the -log sigmoid losses"),
    (["--adam-beta2", "1"], "adam_beta2 must be in [0, 1)"),
    (["--warmup-ratio", "1.5"], "warmup_ratio must be in [0, 1]"),
    (["--num-train-epochs", "0"], "num_train_epochs must be in (0, inf)"),
    (["--max-grad-norm", "-1"], "max_grad_norm must be in [0, inf)"),
    (["--seed", "-1"], "seed must be in [0, 2**32)"),
    (["--nll-weight", "-0.5"], "nll_weight must be a finite number >= 0"),
    (["--max-prompt-length", "0"], "max_prompt_length must be at least 1"),
    (["--eval-fraction", "0.2"], "eval_fraction does not apply to --demo"),
    (["--eval-fraction", "1"], "eval_fraction must be in [0, 1)"),
    (["--overwrite", "yes"], "argument --overwrite: expected true or false, got 'yes'"),
    (["--padding-free", "1"], "argument --padding-free: expected true or false, got '1'"),
    (["--resume", "no-such-folder"], "resume 'no-such-folder': no such checkpoint folder"),
    (["--resume", "latest"], "--resume latest: no checkpoint-* folder in out"),
    (["--backend", "cublas"], "backend 'cublas' cannot run"),
    (["--backend", "triton"], "backend 'triton' cannot run"),
])
def test_values_are_checked_before_any_work(monkeypatch, capsys, tmp_path, args, message):
    from alphadpo_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if "--backend" in args and backends()[args[-1]]:
        pytest.skip(f"backend {args[-1]} can run here")
    code, lines = _run_cli(monkeypatch, capsys, tmp_path, ["--demo", "--output-dir", "out", *args])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("alphadpo-train: error: "), lines
    assert message in lines[0], lines
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content,message", [
    ("beta: two\n", "beta must be a number, got 'two'"),
    ("overwrite: 1\n", "overwrite must be true or false, got 1"),
    ("max_length: 20.5\n", "max_length must be an integer, got 20.5"),
    ("learning_rate: 1e-6\nbeta: -2\n", "beta must be positive, got -2.0"),  # YAML reads 1e-6 as a string: taken
])
def test_yaml_values_are_typed(monkeypatch, capsys, tmp_path, content, message):
    (tmp_path / "c.yaml").write_text(content)
    code, lines = _run_cli(monkeypatch, capsys, tmp_path, ["c.yaml", "--demo", "--output-dir", "out"])
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


def test_values_are_checked_before_the_output_folder(monkeypatch, capsys, tmp_path):
    """A bad value in a folder that holds a previous run is reported as the bad value, and the folder is left as it
    was (the folder check comes second)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("{}\n")
    code, lines = _run_cli(monkeypatch, capsys, tmp_path, ["--demo", "--output-dir", "out", "--beta", "0"])
    assert code == 2 and lines == ["alphadpo-train: error: beta must be positive, got 0.0"]
    assert os.listdir(tmp_path / "out") == ["metrics.jsonl"]


def test_help_agrees_with_what_is_accepted():
    from alphadpo_kernels.train.config import ConfigError, parse_config

    text = build_parser().format_help()
    entries = re.split(r"\n(?=  --)", text.split("options:")[1])
    for entry in entries:
        assert entry.count("(default:") <= 1, entry  # a default is said once
    assert "(default: True)" not in text and "(default: true)" in text  # as the metavar spells it
    assert "(default: None)" not in text
    save = next(e for e in entries if e.lstrip().startswith("--save-steps"))
    assert "checkpoint" in save and "released: 1000000" not in save
    for word in ("true", "TRUE", "false"):
        parse_config(["--demo", "--padding-free", word])
    for word in ("yes", "1", "on", "no", "0", "off"):
        with pytest.raises(ConfigError, match="expected true or false"):
            parse_config(["--demo", "--padding-free", word])


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


def _demo_data():
    from alphadpo_kernels.train.demo import ASSETS

    return os.path.join(ASSETS, "sort_train.jsonl"), os.path.join(ASSETS, "tokenizer")


@pytest.mark.parametrize("case", ["model", "data"])
def test_a_model_or_data_that_cannot_be_loaded_is_one_line(monkeypatch, capsys, tmp_path, case):
    """No such model folder (or hub name, or no connection) and a malformed data file: one line, exit 2, and the
    output folder the run created (here two levels deep) is removed again."""
    from alphadpo_kernels.train import trainer

    train_file, tokenizer = _demo_data()
    (tmp_path / "not-a-model").mkdir()
    if case == "data":
        train_file = str(tmp_path / "bad.jsonl")
        open(train_file, "w").write('{"prompt": "a", "chosen": "b"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["alphadpo-train", "--model-name-or-path", str(tmp_path / "not-a-model"),
                                      "--tokenizer-name-or-path", tokenizer, "--train-file", train_file,
                                      "--mixed-precision", "no", "--output-dir", "runs/first"])
    with pytest.raises(SystemExit) as exc:
        trainer.cli()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1, lines
    what = "the model" if case == "model" else "the data"
    assert lines[0].startswith(f"alphadpo-train: error: cannot load {what}"), lines
    assert sorted(os.listdir(tmp_path)) == sorted(["not-a-model"] + (["bad.jsonl"] if case == "data" else []))
