"""FSDP2 (``torch.distributed.fsdp.fully_shard``) verified on the CPU: two gloo processes, a tiny Llama whose head
is a DTensor outside the root module, the fused loss inside the root's forward (the trainer's glue, and a user's
module). Loss and gradients equal one unsharded process's over two SGD steps (tests/fsdp2_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from helpers import free_port  # noqa: E402


def test_fsdp2_two_processes_equal_one(tmp_path):
    out = tmp_path / "result.json"
    worker = os.path.join(os.path.dirname(__file__), "fsdp2_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           worker, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"], result["errors"]
