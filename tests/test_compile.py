"""Every shipped Triton kernel and block configuration compiles for sm_80 and sm_90 with Triton's own toolchain,
no GPU needed (benchmarks/compile_check.py): no compile error, shared memory within the card's limit,
no acq_rel atomics, and tensor cores without spills for bf16 / fp16 at each architecture's starting point.
The checks themselves are shown to catch what they claim to (a spilling tile, a default-semantics atomic).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import compile_check  # noqa: E402

triton = pytest.importorskip("triton")
try:
    from triton.backends.nvidia.compiler import get_ptxas

    HAVE_PTXAS = os.path.exists(get_ptxas(90).path) and os.path.exists(get_ptxas(80).path)
except Exception:  # noqa: BLE001 - no NVIDIA backend in this Triton build
    HAVE_PTXAS = False

pytestmark = pytest.mark.skipif(not HAVE_PTXAS, reason="Triton's bundled ptxas is not available here")


@pytest.fixture(scope="module")
def shipped_rows():
    return compile_check.run(compile_check.jobs(with_candidates=True), workers=2)


def test_every_shipped_configuration_passes(shipped_rows):
    failing = [(r.kernel, r.config, r.dtype, r.variant, r.arch, r.failures) for r in shipped_rows if r.failures]
    assert not failing, failing
    kernels = {r.kernel for r in shipped_rows}
    assert kernels == {"forward", "merge_splits", "grad_logits", "skip_backward"}
    assert {r.arch for r in shipped_rows} == {80, 90}


def test_half_precision_uses_tensor_cores(shipped_rows):
    for r in shipped_rows:
        if r.dtype in ("bf16", "fp16", "bf16+w32"):
            assert r.tensor_cores == ("HGMMA" if r.arch == 90 else "HMMA"), (r.kernel, r.config, r.arch)


def test_only_the_skipping_kernel_has_atomics_and_they_are_relaxed(shipped_rows):
    for r in shipped_rows:
        if r.kernel == "skip_backward":
            assert r.atomics.startswith("relaxed"), r.atomics
        else:
            assert r.atomics == "none", (r.kernel, r.atomics)


def test_a_spilling_tile_is_caught():
    (row,) = compile_check.run([("grad_logits", "too-wide", dict(
        bwd_block_m=128, bwd_block_n=256, bwd_block_k=64, bwd_num_warps=8, bwd_num_stages=3, bwd_group_m=8),
        "bf16", "bias+softcap", 90, True)], workers=1)
    assert row.ok and row.spill_bytes > 0 and any("spills" in f for f in row.failures)


def test_every_candidate_is_compiled_on_its_architecture_and_checked_for_spills(shipped_rows):
    from alphadpo_kernels.ops.sequence_logps import tuning

    for major, per_kernel in tuning.CANDIDATES.items():
        for prefix, kernel in (("fwd", "forward"), ("bwd", "backward")):
            for i in range(len(per_kernel[kernel])):
                rows = [r for r in shipped_rows if r.config == f"{prefix}-cand{i}-sm{major}0"]
                assert rows and all(r.arch == major * 10 and r.must_not_spill for r in rows), (major, prefix, i)
                assert {r.dtype for r in rows} >= {"bf16", "bf16+w32"}


def test_the_forward_reads_each_block_about_once_per_group():
    """The traffic model at the Llama-3 head, N = 16k: the split grid streams the hidden states once and the head once
    per group of BLOCK_M·GROUP_M tokens, and fills an H200 with several waves from N = 4k; a grid of one program per
    row block walking the whole vocabulary would re-read its hidden block for every vocabulary tile."""
    launch = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    programs, gb = compile_check.traffic("forward", launch, "bf16")
    head, hidden = 128256 * 4096 * 2, 16384 * 4096 * 2
    groups = 16384 // (128 * 8)
    assert gb * 1e9 <= hidden + groups * head + 16 * 16384 * 12 + 8 * 16384
    assert gb * 1e9 < 0.2 * (hidden * 128256 // 128)  # the row-block walk's hidden traffic alone
    programs_4k, _ = compile_check.traffic("forward", launch, "bf16", n=4096)
    assert programs_4k >= 2 * compile_check.SMS and programs >= 8 * compile_check.SMS


def test_atomic_semantics_are_read_from_the_ptx():
    assert compile_check._atomics("  @%p1 atom.global.gpu.acq_rel.add.f32 %r1, [%rd1], %r2;") == "acq_rel×1"
    assert compile_check._atomics("\tred.global.gpu.relaxed.add.f32 [%rd2], %r3;\n") == "relaxed×1"
    assert compile_check._atomics("mov.u32 %r1, %r2;") == "none"
    row = compile_check.Row("k", "c", "bf16", "plain", 90, ok=True, smem_bytes=300 * 1024, smem_limit=227 * 1024,
                            atomics="acq_rel×3")
    assert len(row.failures) == 2
