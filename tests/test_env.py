"""``python -m alphadpo_kernels env``: the environment report for bug reports."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from alphadpo_kernels import __main__ as env_cli
from alphadpo_kernels import __version__, backends


def test_the_command_prints_every_line_a_bug_report_needs():
    proc = subprocess.run([sys.executable, "-m", "alphadpo_kernels", "env"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    assert f"- alphadpo_kernels: {__version__} (" in out
    for name in ("python", "torch", "triton", "transformers", "accelerate", "trl", "backends that can run here",
                 "compiled epilogues", "tuning cache", "CUDA device"):
        assert f"- {name}" in out, name
    if not torch.cuda.is_available():
        assert "- CUDA device: no CUDA device" in out


def test_without_a_command_it_says_how_to_call_it():
    proc = subprocess.run([sys.executable, "-m", "alphadpo_kernels"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage: python -m alphadpo_kernels" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_report_matches_backends(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("ALPHADPO_TUNING_CACHE", str(tmp_path / "none.json"))
    assert env_cli.main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    can = backends()
    assert report["alphadpo_kernels"]["version"] == __version__
    assert report["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report["backends"] == {k: can[k] for k in ("torch", "triton", "triton_interpreter", "cublas")}
    assert list(report["compiled_epilogues"].values()) == [can["cpu_epilogue"], can["cuda_epilogue"]]
    assert report["tuning_cache"] == {"path": str(tmp_path / "none.json"), "exists": False}
    assert len(report["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_absent_libraries_say_not_installed():
    assert env_cli._version("surely-not-an-installed-distribution") == "not installed"
    report = env_cli.collect()
    report["versions"]["trl"] = "not installed"
    assert "- trl: not installed" in env_cli.format_report(report)


def test_tuning_cache_entries_are_counted(monkeypatch, tmp_path):
    cache = tmp_path / "tuning.json"
    cache.write_text(json.dumps({"NVIDIA H100 80GB HBM3|H=4096|V=128256|bfloat16": {"options": {}},
                                 "NVIDIA A100-SXM4-80GB|H=4096|V=128256|bfloat16": {"options": {}}}))
    monkeypatch.setenv("ALPHADPO_TUNING_CACHE", str(cache))
    info = env_cli._tuning_cache([{"name": "NVIDIA H100 80GB HBM3"}])
    assert info == {"path": str(cache), "exists": True, "entries": 2, "entries_for_these_cards": 1}
    text = env_cli.format_report({**env_cli.collect(), "tuning_cache": info})
    assert f"- tuning cache: {cache}: 2 entries, 1 for the card(s) here" in text
    cache.write_text("{not json")
    assert env_cli._tuning_cache([])["error"].startswith("unreadable")


def test_interpreter_is_reported_as_a_cpu_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    report = env_cli.collect()
    text = env_cli.format_report(report)
    if not torch.cuda.is_available() and report["backends"]["triton_interpreter"]:
        assert "triton (interpreter, CPU tensors, slow)" in text
    assert "TRITON_INTERPRET=1" in text


def test_console_script_entry_point(monkeypatch, capsys):
    """``alphadpo-env`` (when pyproject.toml names ``alphadpo_kernels.__main__:env_main``) is ``env`` itself."""
    import pytest

    monkeypatch.setattr(sys, "argv", ["alphadpo-env", "--json"])
    with pytest.raises(SystemExit) as exc:
        env_cli.env_main()
    assert exc.value.code == 0 and json.loads(capsys.readouterr().out)["alphadpo_kernels"]["version"] == __version__
