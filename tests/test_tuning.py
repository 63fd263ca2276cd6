"""The autotune plumbing: candidates are timed, broken or wrong ones dropped, the winner cached and used."""

from __future__ import annotations

import json

from alphadpo_kernels import LogpsOptions, fused_sequence_logps
from alphadpo_kernels.ops.sequence_logps import tuning
from helpers import make_inputs

SMALL = dict(fwd_block_m=16, fwd_block_n=32, fwd_block_k=16, bwd_block_m=16, bwd_block_n=32, bwd_block_k=16)
BIGGER = dict(fwd_block_m=32, fwd_block_n=64, fwd_block_k=16, bwd_block_m=32, bwd_block_n=64, bwd_block_k=16)


def _fake_timer(times):
    """Deterministic stand-in for CUDA events: each candidate's time comes from `times` by call order."""
    it = iter(times)

    def timer(fn):
        fn()
        return next(it)
    return timer


def test_autotune_picks_the_fastest_and_caches_it(tmp_path):
    hidden, weight, labels, _ = make_inputs(rows=2, seq=9, hdim=16, vocab=40, seed=1)
    path = str(tmp_path / "tuning.json")
    bad = dict(SMALL, fwd_block_n=24)  # not a power of two: rejected by LogpsOptions
    record = tuning.autotune(hidden, weight, labels, candidates=[SMALL, bad, BIGGER], repeats=1, warmup=0,
                             timer=_fake_timer([5.0, 2.0]), path=path)
    assert record["options"] == BIGGER and record["ms"] == 2.0
    assert "error" in record["results"][1] and "power of two" in record["results"][1]["error"]
    saved = json.loads(open(path).read())
    assert saved[record["key"]]["options"] == BIGGER
    opts = tuning.default_options(hidden.device, hidden.dtype, 16, 40, path=path)
    assert opts.fwd_block_n == 64 and opts.bwd_block_m == 32


def test_candidate_that_disagrees_is_dropped(tmp_path, monkeypatch):
    hidden, weight, labels, _ = make_inputs(rows=2, seq=9, hdim=16, vocab=40, seed=2)
    from alphadpo_kernels.ops.sequence_logps import triton_forward

    real = triton_forward.forward

    def wrong_for_bigger(h, w, b, t, opts, **kw):
        logp, lse = real(h, w, b, t, opts, **kw)
        return (logp + 1.0, lse) if opts.fwd_block_n == 64 else (logp, lse)

    monkeypatch.setattr(triton_forward, "forward", wrong_for_bigger)
    record = tuning.autotune(hidden, weight, labels, candidates=[SMALL, BIGGER], repeats=1, warmup=0,
                             timer=_fake_timer([3.0]), path=str(tmp_path / "t.json"))
    assert record["options"] == SMALL
    assert "disagrees with the torch backend" in record["results"][1]["error"]


def test_public_op_reads_the_cache(tmp_path, monkeypatch):
    hidden, weight, labels, _ = make_inputs(rows=2, seq=9, hdim=16, vocab=40, seed=3)
    path = tmp_path / "tuning.json"
    key = tuning.cache_key(hidden.device, hidden.dtype, 16, 40)
    path.write_text(json.dumps({key: {"options": SMALL, "ms": 1.0}}))
    monkeypatch.setenv("ALPHADPO_TUNING_CACHE", str(path))
    seen = []
    from alphadpo_kernels.ops.sequence_logps import triton_forward

    real = triton_forward.forward
    monkeypatch.setattr(triton_forward, "forward", lambda h, w, b, t, opts, **kw: (seen.append(opts), real(h, w, b, t, opts, **kw))[1])
    fused_sequence_logps(hidden, weight, labels, backend="triton")
    assert seen[0].fwd_block_m == 16 and seen[0].fwd_block_n == 32


def test_arch_defaults_are_valid_options():
    for fields in tuning.ARCH_DEFAULTS.values():
        LogpsOptions(**fields)
    for fields in tuning.CANDIDATES:
        LogpsOptions(**fields)
