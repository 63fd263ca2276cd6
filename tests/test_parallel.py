"""Context- and vocabulary-parallel log-probs and loss, checked on the CPU with gloo (tests/parallel_worker.py):
two processes CP (torch's head-tail layout; a contiguous split of an odd T; packed), two processes TP (odd
vocabulary: uneven shards; DTensor and plain shards; torch and triton; fast and lean), four processes on a 2 × 2
cp × tp mesh, and the errors. Each run equals one unsharded process and the float64 reference: log-probs, loss,
dH per shard, dW (summed over cp, per shard over tp) and α-DPO's margin statistics on every rank.

Also, in one process: every backend handles the vocabulary-parallel "no target in this shard" sentinel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from alphadpo_kernels import LogpsOptions
from alphadpo_kernels.ops.sequence_logps import parallel
from conftest import rel_err
from helpers import free_port

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")


def _run(mode: str, nproc: int, tmp_path):
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), WORKER, mode, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(nproc):
        result = json.loads((tmp_path / f"{mode}.rank{r}.json").read_text())
        assert result["ok"], "\n".join(result["errors"])


def test_context_parallel_two_processes(tmp_path):
    _run("cp", 2, tmp_path)


def test_vocabulary_parallel_two_processes(tmp_path):
    _run("tp", 2, tmp_path)


def test_cp_by_tp_mesh_four_processes(tmp_path):
    _run("cptp", 4, tmp_path)


def test_parallel_errors_two_processes(tmp_path):
    _run("errors", 2, tmp_path)


def test_shift_with_cp_group_refused_before_any_collective():
    from alphadpo_kernels import fused_sequence_logps

    hidden, weight, labels = torch.randn(2, 4, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 4))
    with pytest.raises(ValueError, match=r"shift=True cannot be combined with cp_group"):
        fused_sequence_logps(hidden, weight, labels, shift=True, cp_group=object())


@pytest.mark.parametrize("backend", ["torch", "torch-no-extension", "triton"])  # torch: the C++ epilogue
@pytest.mark.parametrize("softcap", [None, 7.0])
def test_backends_take_the_no_target_sentinel(backend, softcap):
    """A live token whose label is in another vocabulary shard: target logit 0 (token_logp = −lse) and
    ``dz = −g·softmax`` (no one-hot), in every backend and epilogue, whatever the tile tails."""
    from alphadpo_kernels.ops.sequence_logps import _backend_module

    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 9, 16, 37  # the last tile of 16 columns is padded: a sentinel of V would match a padded column
    hidden, weight = torch.randn(n, hdim, generator=g), torch.randn(vocab, hdim, generator=g) / 4
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::2] = parallel.NO_TARGET
    targets[1] = -1
    opts = LogpsOptions(softcap=softcap, use_extension=backend != "torch-no-extension", fwd_block_m=16,
                        fwd_block_n=16, fwd_block_k=16, bwd_block_m=16, bwd_block_n=16, bwd_block_k=16,
                        fwd_splits=2, chunk_vocab=16)
    fwd, bwd = _backend_module("triton" if backend == "triton" else "torch")
    token_logps, lse = fwd(hidden, weight, None, targets, opts)
    z = hidden.double() @ weight.double().T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref_lse = torch.logsumexp(z, 1)
    owned = (targets >= 0) & (targets < vocab)
    ref_logp = torch.where(owned, z.gather(1, targets.clamp(0, vocab - 1)[:, None])[:, 0], 0.0) - ref_lse
    live = targets >= 0
    assert rel_err(lse[live], ref_lse[live]) < 1e-5
    assert rel_err(token_logps[live], ref_logp[live]) < 1e-5
    gtok = torch.where(live, torch.linspace(0.5, 1.5, n), 0.0)
    dh, dw, _ = bwd(hidden, weight, None, targets, lse, gtok, opts, True, True, False)
    p = torch.softmax(z, 1)
    onehot = torch.zeros_like(p)
    onehot[owned] = torch.nn.functional.one_hot(targets[owned], vocab).double()
    dz = gtok.double()[:, None] * (onehot - p)
    if softcap is not None:
        dz = dz * (1 - (z / softcap) ** 2)
    assert rel_err(dh, dz @ weight.double()) < 1e-4
    assert rel_err(dw, dz.T @ hidden.double()) < 1e-4


def test_local_targets():
    t = torch.tensor([-1, 0, 5, 18, 19, 36])
    assert parallel.local_targets(t, 0, 19).tolist() == [-1, 0, 5, 18, parallel.NO_TARGET, parallel.NO_TARGET]
    assert parallel.local_targets(t, 19, 18).tolist() == [-1, parallel.NO_TARGET, parallel.NO_TARGET,
                                                         parallel.NO_TARGET, 0, 17]
