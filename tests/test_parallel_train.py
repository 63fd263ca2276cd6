"""``alphadpo-train --context-parallel N`` and ``--tensor-parallel N`` on CPU processes (gloo), against one plain
process on the same global batch: every logged metric (losses, α-DPO's margin statistics, rewards, reference
log-probs, evaluation) and the final weights.

The runs start ``tests/cp_train_worker.py`` under ``torchrun``: the trainer itself, with an exact stand-in for
ring attention (each rank gathers the cp group's keys and values; SDPA's CPU kernels have no ring version).
Everything else — accelerate's data loaders over the data-parallel ranks, torch's head-tail sharding of the
inputs, the fused loss over the cp group, the loss scaled by cp, DDP's reduction, transformers' ``tp_plan`` with a
vocabulary-sharded head — is the code that runs on GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers import free_port, save_tiny_llama  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
WORKER = os.path.join(ROOT, "tests", "cp_train_worker.py")
# 3 optimizer steps of 2 micro-batches, 4 pairs per micro-batch in all, fp32
STEPS = ["--demo", "--max-steps", "3", "--gradient-accumulation-steps", "2", "--eval-steps", "2",
         "--logging-steps", "1", "--mixed-precision", "no", "--learning-rate", "1e-3", "--backend", "torch"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def run(out, model: str, procs: int, batch: int, *flags: str) -> dict:
    if procs == 1:
        cmd = [sys.executable, "-m", "alphadpo_kernels.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
               str(free_port()), WORKER]
    cmd += [*STEPS, "--model-name-or-path", model, "--per-device-train-batch-size", str(batch),
            "--per-device-eval-batch-size", str(batch), "--output-dir", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_process(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run(out, tiny_llama, 1, 4)
    return out


def _log(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b) -> None:
    la, lb = _log(a), _log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    compared = 0
    for ra, rb in zip(la, lb):
        assert set(ra) == set(rb)
        for key, va in ra.items():
            if key in ("step", "epoch") or not isinstance(va, float):
                continue
            # float32 sums in another order; α-DPO divides by a margin std of ~5e-4, which magnifies them
            assert abs(rb[key] - va) <= 2e-4 * abs(va) + 1e-6, (ra["step"], key, va, rb[key])
            compared += 1
    assert compared > 30
    from safetensors.torch import load_file

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        assert float((wa[k] - wb[k]).abs().max()) <= 1e-5 * float(wa[k].abs().max()), k


@pytest.mark.parametrize("procs,batch,flags,sizes", [
    (2, 4, ["--context-parallel", "2", "--attn-implementation", "cp_gather"], (1, 2, 1)),
    (2, 4, ["--tensor-parallel", "2"], (1, 1, 2)),
    (4, 2, ["--context-parallel", "2", "--attn-implementation", "cp_gather"], (2, 2, 1)),
], ids=["cp2", "tp2", "dp2xcp2"])
def test_parallel_run_equals_one_process(one_process, tiny_llama, tmp_path, procs, batch, flags, sizes):
    summary = run(tmp_path, tiny_llama, procs, batch, *flags)
    dist = summary["distributed"]
    assert (dist["data_parallel"], dist["context_parallel"], dist["tensor_parallel"]) == sizes
    assert dist["num_processes"] == procs
    assert_same_run(one_process, tmp_path)


def test_context_parallel_refuses_a_local_attention(tiny_llama, tmp_path):
    """eager attention under cp would attend within each rank's tokens only: refused by name."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), WORKER, *STEPS, "--model-name-or-path", tiny_llama, "--output-dir", str(tmp_path),
           "--context-parallel", "2", "--attn-implementation", "eager"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode != 0
    assert "--context-parallel needs attn_implementation sdpa" in proc.stderr


@pytest.mark.parametrize("flags,message", [
    (["--context-parallel", "0"], "context_parallel must be at least 1"),
    (["--tensor-parallel", "-2"], "tensor_parallel must be at least 1"),
    (["--context-parallel", "2", "--padding-free", "true"], "padding_free does not combine with context_parallel"),
    (["--context-parallel", "2", "--lora-r", "4"], "LoRA with context_parallel"),
    (["--context-parallel", "3"], "must divide the number of processes (1)"),
])
def test_cli_refuses_bad_parallel_settings(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, "-m", "alphadpo_kernels.train", "--demo", "--output-dir", str(tmp_path / "o"),
                           *flags], capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
