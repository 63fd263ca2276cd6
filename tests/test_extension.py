"""The compiled epilogues (csrc/): against the plain-torch epilogue and the fp64 reference, fallback when absent,
and bad inputs caught on the Python side before any pointer is passed."""

from __future__ import annotations

import os

import pytest
import torch

from alphadpo_kernels import LogpsOptions, backends, fused_sequence_logps, reference_sequence_logps
from alphadpo_kernels import _extension
from alphadpo_kernels.ops.sequence_logps import torch_chunked
from alphadpo_kernels.ops.sequence_logps.torch_chunked import ExtensionEpilogue, TorchEpilogue
from conftest import rel_err
from helpers import check_against_fp64, make_inputs

REQUIRED = os.environ.get("ALPHADPO_REQUIRE_EXTENSIONS") == "1"


def _built(mod, name: str):
    """The module, or fail (CI requires the build) / skip (a machine without a compiler)."""
    if mod is None:
        if REQUIRED:
            pytest.fail(f"ALPHADPO_REQUIRE_EXTENSIONS=1 but alphadpo_kernels.{name} is not built")
        pytest.skip(f"alphadpo_kernels.{name} not built")
    return mod


@pytest.fixture(scope="module")
def cpu_ext():
    return _built(_extension.cpu_module(), "_C")


def _chunk(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 3


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_epilogues_agree_over_online_chunks(cpu_ext, softcap):
    n, vocab, chunk = 13, 111, 37
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, vocab, (n,), generator=g)
    full = _chunk(n, vocab, 2)
    states = {}
    for name, epi in (("torch", TorchEpilogue), ("ext", ExtensionEpilogue)):
        m, s, tz = torch.full((n,), float("-inf")), torch.zeros(n), torch.zeros(n)
        for vs in range(0, vocab, chunk):  # the last chunk is short
            epi.lse_update(full[:, vs:vs + chunk].clone(), targets, vs, softcap, m, s, tz)
        states[name] = (m, s, tz)
    for a, b in zip(states["ext"], states["torch"]):
        assert rel_err(a, b) < 1e-6
    zc = softcap * torch.tanh(full.double() / softcap) if softcap else full.double()
    lse = torch.logsumexp(zc, 1)
    m, s, _ = states["ext"]
    assert rel_err(m + torch.log(s), lse) < 1e-6
    lse32, gvec = lse.float(), torch.randn(n, generator=g)
    for vs in range(0, vocab, chunk):
        a = ExtensionEpilogue.grad_logits(full[:, vs:vs + chunk].clone(), targets, vs, softcap, lse32, gvec)
        b = TorchEpilogue.grad_logits(full[:, vs:vs + chunk].clone(), targets, vs, softcap, lse32, gvec)
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_torch_backend_with_extension_matches_reference(cpu_ext, dtype, softcap):
    hidden, weight, labels, bias = make_inputs(dtype=dtype, bias=True, seed=3)
    opts = LogpsOptions(chunk_tokens=9, chunk_vocab=40)
    assert torch_chunked.pick_epilogue(hidden.device, opts) is ExtensionEpilogue
    check_against_fp64(hidden, weight, labels, bias, grad_tol=1e-4 if dtype == torch.float32 else 2e-2,
                       softcap=softcap, shift=True, backend="torch", options=opts)


def test_fallback_when_the_extension_is_absent(monkeypatch):
    monkeypatch.setattr(_extension, "cpu_module", lambda: None)
    hidden, weight, labels, _ = make_inputs(seed=5)
    assert torch_chunked.pick_epilogue(hidden.device, LogpsOptions()) is TorchEpilogue
    assert backends()["cpu_epilogue"] is False
    out = fused_sequence_logps(hidden, weight, labels, backend="torch")
    assert rel_err(out, reference_sequence_logps(hidden, weight, labels)) < 1e-5
    z, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="extension is not built"):
        _extension.lse_update(z, t, 0, None, torch.zeros(2), torch.zeros(2), torch.zeros(2))


def test_switching_the_extension_off_uses_torch():
    assert torch_chunked.pick_epilogue(torch.device("cpu"), LogpsOptions(use_extension=False)) is TorchEpilogue


@pytest.mark.parametrize("case,match", [
    ("float64", "logits must be a 2-D float32 tensor"),
    ("transposed", "unit column stride"),
    ("targets_int32", "targets must be a contiguous int64 tensor of shape"),
    ("targets_short", r"targets must be a contiguous int64 tensor of shape \(4,\)"),
    ("m_short", r"m must be a contiguous float32 tensor of shape \(4,\)"),
    ("s_strided", "s must be a contiguous float32 tensor"),
    ("tz_double", "tz must be a contiguous float32 tensor"),
])
def test_bad_inputs_are_caught_before_the_call(cpu_ext, case, match):
    z, t = torch.zeros(4, 6), torch.zeros(4, dtype=torch.long)
    m, s, tz = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    if case == "float64":
        z = z.double()
    elif case == "transposed":
        z = torch.zeros(6, 4).T
    elif case == "targets_int32":
        t = t.int()
    elif case == "targets_short":
        t = t[:3]
    elif case == "m_short":
        m = m[:2]
    elif case == "s_strided":
        s = torch.zeros(8)[::2]
    elif case == "tz_double":
        tz = tz.double()
    with pytest.raises(ValueError, match=match):
        _extension.lse_update(z, t, 0, None, m, s, tz)
    if case != "tz_double":  # grad_logits takes (lse, g) = (m, s) here; tz is forward-only
        with pytest.raises(ValueError):
            _extension.grad_logits(z, t, 0, None, m, s)


def test_cuda_extension_imports_without_a_gpu():
    mod = _built(_extension.cuda_module(), "_C_cuda")
    assert mod.device_count() >= 0
    assert backends()["cuda_epilogue"] is True


def test_cublas_backend_refuses_cpu_tensors():
    hidden, weight, labels, _ = make_inputs(seed=7)
    with pytest.raises(ValueError, match="backend='cublas' needs CUDA tensors"):
        fused_sequence_logps(hidden, weight, labels, backend="cublas")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,grad_tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
def test_cublas_backend_on_gpu(dtype, grad_tol, softcap):
    hidden, weight, labels, bias = make_inputs(rows=4, seq=257, hdim=512, vocab=32003, dtype=dtype, bias=True,
                                               seed=9, device="cuda")
    check_against_fp64(hidden, weight, labels, bias, logp_tol=1e-4, grad_tol=grad_tol, softcap=softcap, shift=True,
                       backend="cublas", options=LogpsOptions(memory_budget_mb=32))
