"""The autotune plumbing: candidates are timed, broken or wrong ones dropped, the winner cached and used."""

from __future__ import annotations

import json

from alphadpo_kernels import LogpsOptions, fused_sequence_logps
from alphadpo_kernels.ops.sequence_logps import tuning
from helpers import make_inputs

FWD_SMALL = dict(fwd_block_m=16, fwd_block_n=32, fwd_block_k=16, fwd_group_m=2)
FWD_BIGGER = dict(fwd_block_m=32, fwd_block_n=64, fwd_block_k=16, fwd_group_m=1)
BWD_SMALL = dict(bwd_block_m=16, bwd_block_n=32, bwd_block_k=16)
BWD_BIGGER = dict(bwd_block_m=32, bwd_block_n=64, bwd_block_k=16, bwd_group_m=2)
SMALL = dict(FWD_SMALL, **BWD_SMALL)


def _fake_timer(times):
    """Deterministic stand-in for CUDA events: each candidate's time comes from `times` by call order."""
    it = iter(times)

    def timer(fn):
        fn()
        return next(it)
    return timer


def test_autotune_times_each_kernel_on_its_own_and_caches_both_winners(tmp_path):
    hidden, weight, labels, _ = make_inputs(rows=2, seq=9, hdim=16, vocab=40, seed=1)
    path = str(tmp_path / "tuning.json")
    bad = dict(FWD_SMALL, fwd_block_n=24)  # not a power of two: rejected by LogpsOptions
    cands = {"forward": [FWD_SMALL, bad, FWD_BIGGER], "backward": [BWD_SMALL, BWD_BIGGER]}
    # forward: SMALL 5 ms, BIGGER 2 ms; backward: SMALL 1 ms, BIGGER 3 ms
    record = tuning.autotune(hidden, weight, labels, candidates=cands, repeats=1, warmup=0,
                             timer=_fake_timer([5.0, 2.0, 1.0, 3.0]), path=path)
    assert {k: record["options"][k] for k in SMALL} == dict(FWD_BIGGER, **BWD_SMALL)
    assert record["ms"] == {"forward": 2.0, "backward": 1.0}
    assert "power of two" in record["results"]["forward"][1]["error"]
    saved = json.loads(open(path).read())
    assert saved[record["key"]]["options"] == record["options"]
    opts = tuning.default_options(hidden.device, hidden.dtype, 16, 40, path=path)
    assert opts.fwd_block_n == 64 and opts.fwd_group_m == 1 and opts.bwd_block_m == 16
    # fields no candidate set keep the architecture's start
    assert opts.bwd_num_warps == tuning.ARCH_DEFAULTS[tuning.FALLBACK_MAJOR]["bwd_num_warps"]


def test_candidate_that_disagrees_is_dropped(tmp_path, monkeypatch):
    hidden, weight, labels, _ = make_inputs(rows=2, seq=9, hdim=16, vocab=40, seed=2)
    from alphadpo_kernels.ops.sequence_logps import triton_forward, triton_grad_logits

    real = triton_forward.forward

    def wrong_for_bigger(h, w, b, t, opts, **kw):
        logp, lse = real(h, w, b, t, opts, **kw)
        return (logp + 1.0, lse) if opts.fwd_block_n == 64 else (logp, lse)

    real_call = triton_grad_logits.TritonGradLogits.__call__

    def wrong_dz_for_bigger(self, hc, tgt, lse, g, vs, ve, dz, db, scratch=None, w_c=None):
        real_call(self, hc, tgt, lse, g, vs, ve, dz, db, scratch, w_c)
        if self.opts.bwd_block_n == 64:
            dz.add_(1.0)

    monkeypatch.setattr(triton_forward, "forward", wrong_for_bigger)
    monkeypatch.setattr(triton_grad_logits.TritonGradLogits, "__call__", wrong_dz_for_bigger)
    cands = {"forward": [FWD_SMALL, FWD_BIGGER], "backward": [BWD_SMALL, BWD_BIGGER]}
    record = tuning.autotune(hidden, weight, labels, candidates=cands, repeats=1, warmup=0,
                             timer=_fake_timer([3.0, 4.0]), path=str(tmp_path / "t.json"))
    assert {k: record["options"][k] for k in SMALL} == SMALL
    assert "disagrees with the torch backend" in record["results"]["forward"][1]["error"]
    assert "disagrees with the torch backend" in record["results"]["backward"][1]["error"]


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
    for per_kernel in tuning.CANDIDATES.values():
        for kernel, prefix in (("forward", "fwd_"), ("backward", "bwd_")):
            for fields in per_kernel[kernel]:
                LogpsOptions(**fields)
                assert all(k.startswith(prefix) for k in fields)  # a candidate configures its own kernel only
