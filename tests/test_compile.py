"""Every shipped Triton kernel and block configuration compiles for sm_80 and sm_90 with Triton's own toolchain,
no GPU needed (benchmarks/compile_check.py, SPEC §5): no compile error, shared memory within the card's limit,
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
    assert kernels == {"forward", "grad_logits", "skip_backward"}
    assert {r.arch for r in shipped_rows} == {80, 90}


def test_half_precision_uses_tensor_cores(shipped_rows):
    for r in shipped_rows:
        if r.dtype in ("bf16", "fp16"):
            assert r.tensor_cores == ("HGMMA" if r.arch == 90 else "HMMA"), (r.kernel, r.config, r.arch)


def test_only_the_skipping_kernel_has_atomics_and_they_are_relaxed(shipped_rows):
    for r in shipped_rows:
        if r.kernel == "skip_backward":
            assert r.atomics.startswith("relaxed"), r.atomics
        else:
            assert r.atomics == "none", (r.kernel, r.atomics)


def test_a_spilling_tile_is_caught():
    (row,) = compile_check.run([("grad_logits", "too-wide", dict(
        fwd_block_m=128, fwd_block_n=256, fwd_block_k=64, bwd_block_m=128, bwd_block_n=256, bwd_block_k=64,
        num_warps=8, num_stages=3), "bf16", "bias+softcap", 90, True)], workers=1)
    assert row.ok and row.spill_bytes > 0 and any("spills" in f for f in row.failures)


def test_atomic_semantics_are_read_from_the_ptx():
    assert compile_check._atomics("  @%p1 atom.global.gpu.acq_rel.add.f32 %r1, [%rd1], %r2;") == "acq_rel×1"
    assert compile_check._atomics("\tred.global.gpu.relaxed.add.f32 [%rd2], %r3;\n") == "relaxed×1"
    assert compile_check._atomics("mov.u32 %r1, %r2;") == "none"
    row = compile_check.Row("k", "c", "bf16", "plain", 90, ok=True, smem_bytes=300 * 1024, smem_limit=227 * 1024,
                            atomics="acq_rel×3")
    assert len(row.failures) == 2
