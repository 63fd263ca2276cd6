"""Adversarial inputs: no silent wrong result, no state poisoned by one bad batch, every argument checked.

Each case failed before its fix (issue "Hardening"); the randomized differential test at the end runs every
backend over random shapes, strides, dtypes, masks and options against the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alphadpo_kernels import FusedAlphaDPOLoss, LogpsOptions, fused_alpha_dpo_loss, fused_sequence_logps
from alphadpo_kernels import reference_sequence_logps
from conftest import rel_err
from helpers import SMALL_BLOCKS, cublas_on_cpu, make_inputs


@pytest.fixture(params=["torch", "triton", "cublas"])
def backend(request, monkeypatch):
    if request.param == "cublas":
        cublas_on_cpu(monkeypatch)
    return request.param


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a buffer twice as long)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buf[..., ::2] = t
    view = buf[..., ::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


# --------------------------------------------------------------------------------------- silent wrong results


def test_every_tensor_argument_may_be_a_strided_view(backend):
    """hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, ref log-probs: strided views give the
    contiguous results and gradients (a strided bias was read with unit stride by the Triton kernels)."""
    hidden, weight, labels, bias = make_inputs(bias=True, seed=61)
    ref_hidden = hidden + 0.05 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(61))
    # DPO's head: no margin normalisation to amplify the last-bit differences of another BLAS path
    kw = dict(backend=backend, options=SMALL_BLOCKS, shift=True, softcap=3.0, loss_type="sigmoid")

    def run(h, w, b, y, rh, rw, rb):
        h, w, b = (t.detach().requires_grad_() for t in (h, w, b))
        out = fused_alpha_dpo_loss(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, **kw)
        return (out.loss, out.chosen_logps, out.ref_chosen_logps, *torch.autograd.grad(out.loss, [h, w, b]))

    plain = run(hidden, weight, bias, labels, ref_hidden, weight, bias)
    views = run(_strided(hidden), weight.T.contiguous().T, _strided(bias), _strided(labels), _strided(ref_hidden),
                _strided(weight), _strided(bias))
    for a, b in zip(plain, views):
        assert rel_err(b, a) < 1e-6
    given_ref = dict(ref_chosen_logps=_strided(torch.full((2, 1), -2.0))[:, 0],
                     ref_rejected_logps=_strided(torch.full((2, 1), -2.5))[:, 0])
    out = fused_alpha_dpo_loss(hidden, weight, labels, **given_ref, backend=backend, options=SMALL_BLOCKS)
    assert torch.isfinite(out.loss)


def test_double_backward_is_a_clear_error(backend):
    """The op's backward is not itself differentiable; a gradient penalty must fail loudly, not be 100× off
    (the torch backend's in-place epilogue) or silently zero."""
    hidden, weight, labels, _ = make_inputs(seed=63)
    hidden.requires_grad_()
    out = fused_sequence_logps(hidden, weight, labels, backend=backend, options=SMALL_BLOCKS)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(out.sum(), [hidden], create_graph=True)
    (g,) = torch.autograd.grad(out.sum(), [hidden])  # first-order gradients as usual
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype,vocab,ok", [(torch.uint8, 50, False), (torch.int8, 100, True), (torch.int8, 200, False),
                                            (torch.int16, 40_000, False), (torch.int16, 123, True),
                                            (torch.int32, 123, True)])
def test_label_dtypes_must_hold_ignore_index_and_the_vocabulary(dtype, vocab, ok):
    hidden, weight, labels, _ = make_inputs(vocab=min(vocab, 123), seed=65)
    if vocab > 123:
        weight = torch.randn(vocab, hidden.shape[-1]) * 0.1
    labels = labels.clamp(max=min(vocab, 127) - 1).masked_fill(labels == -100, -100) if ok or dtype != torch.uint8 \
        else labels.clamp(min=0, max=49)
    if ok:
        out = fused_sequence_logps(hidden, weight, labels.to(dtype), backend="torch")
        assert torch.equal(out, fused_sequence_logps(hidden, weight, labels, backend="torch"))
    else:
        with pytest.raises(TypeError, match=f"labels of dtype {dtype} cannot hold"):
            fused_sequence_logps(hidden, weight, labels.to(dtype), backend="torch")


def test_reference_head_bounds_the_labels_too():
    hidden, weight, labels, _ = make_inputs(seed=67)
    small = weight[:100]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 100\) \(the vocabulary of ref_weight\)"):
        fused_alpha_dpo_loss(hidden, weight, labels.masked_fill(labels >= 0, 110), ref_hidden=hidden,
                             ref_weight=small, backend="torch")


def test_float64_reference_hidden_is_named_as_passed():
    hidden, weight, labels, _ = make_inputs(seed=69)
    with pytest.raises(TypeError, match="ref_hidden must be a floating tensor .* float64 is for"):
        fused_alpha_dpo_loss(hidden, weight, labels, ref_hidden=hidden.double(), ref_weight=weight, backend="torch")
    with pytest.raises(TypeError, match="^hidden must be a floating tensor"):
        fused_sequence_logps(hidden.double(), weight, labels)


# --------------------------------------------------------------------------------------- state and bad batches


def _steps(batches, module):
    return [module(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr, backend="torch") for h, w, y, rc, rr in batches]


def _batch(seed, poison=None):
    hidden, weight, labels, _ = make_inputs(rows=4, seed=seed)
    rc, rr = torch.full((2,), -2.0) - 0.1 * seed, torch.full((2,), -2.2)
    if poison == "hidden":
        live = (labels != -100).nonzero()[0]
        hidden[live[0], live[1], 0] = float("nan")
    if poison == "ref":
        rc = rc.clone()
        rc[1] = float("inf")
    return hidden, weight, labels, rc, rr


@pytest.mark.parametrize("poison", ["hidden", "ref"])
def test_one_bad_batch_never_changes_the_margin_statistics(poison):
    """A NaN in a live hidden state (or an inf reference log-prob with check_values off) makes that step's loss
    non-finite and counts the pair; the running statistics, and so every later loss, are those of the clean
    steps alone (before: NaN forever, and every later step silently SimPO)."""
    clean = [_batch(1), _batch(2), _batch(3)]
    bad = [_batch(1), _batch(9, poison), _batch(2), _batch(3)]
    m_clean = FusedAlphaDPOLoss(check_values=False)
    m_bad = FusedAlphaDPOLoss(check_values=False)
    out_clean, out_bad = _steps(clean, m_clean), _steps(bad, m_bad)
    assert not torch.isfinite(out_bad[1].loss) and out_bad[1].metrics["nonfinite_pairs"] == 1
    assert torch.equal(out_bad[1].margin_mean, out_bad[0].margin_mean)
    for a, b in zip(out_clean, [out_bad[0], *out_bad[2:]]):
        assert torch.equal(a.loss, b.loss) and a.metrics["nonfinite_pairs"] == 0
    assert torch.equal(m_clean.margin_mean, m_bad.margin_mean) and torch.equal(m_clean.margin_std, m_bad.margin_std)


def test_non_finite_reference_logps_are_rejected_by_name():
    hidden, weight, labels, rc, rr = _batch(1, "ref")
    with pytest.raises(ValueError, match=r"ref_chosen_logps must be finite; pairs \[1\]"):
        fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, backend="torch")


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "parent"])
def test_margin_statistics_stay_float32_whatever_the_module_is_cast_to(cast):
    module = FusedAlphaDPOLoss()
    _steps([_batch(1), _batch(2)], module)
    before = (module.margin_mean.clone(), module.margin_std.clone())
    if cast == "parent":
        parent = torch.nn.Sequential(torch.nn.Linear(2, 2), module).to(torch.bfloat16)
        assert parent[0].weight.dtype == torch.bfloat16
    else:
        getattr(module, cast)()
    assert module.margin_mean.dtype == module.margin_std.dtype == torch.float32
    assert torch.equal(module.margin_mean, before[0]) and torch.equal(module.margin_std, before[1])
    assert set(module.state_dict()) == {"margin_mean", "margin_std"}


# --------------------------------------------------------------------------------------- accepted nonsense


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta must be positive"), (dict(beta=-1.0), "beta must be positive"),
    (dict(beta=math.nan), "beta must be a finite number"), (dict(gamma_beta_ratio=math.inf), "gamma_beta_ratio"),
    (dict(alpha=math.nan), "alpha must be a finite number"), (dict(ema_momentum=1.0), r"ema_momentum must be in \[0, 1\)"),
    (dict(ema_momentum=-0.1), "ema_momentum"), (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(std_eps=-1e-8), "std_eps must be >= 0"), (dict(softcap=0.0), "softcap must be a positive finite number"),
    (dict(softcap=math.inf), "softcap must be a positive finite number"), (dict(beta="2.5"), "beta must be a finite"),
])
@pytest.mark.parametrize("form", ["functional", "module"])
def test_hyper_parameters_are_checked_in_both_forms(kwargs, match, form):
    hidden, weight, labels, rc, rr = _batch(1)
    with pytest.raises(ValueError, match=match):
        if form == "functional":
            fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, **kwargs)
        else:
            FusedAlphaDPOLoss(**kwargs)


# --------------------------------------------------------------------------------------- dead rows


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN from the inf in the interpreter, on purpose
@pytest.mark.parametrize("skipping", [False, True], ids=["chunked", "skip-kernel"])
def test_dead_rows_get_exact_zeros_whatever_the_head_holds(skipping):
    """A head with an inf entry: live rows' dH is whatever it is, dead rows' is exactly 0 (0·inf was NaN)."""
    hidden, weight, labels, _ = make_inputs(dtype=torch.bfloat16, seed=71)
    weight[5, 3] = float("inf")
    hidden.requires_grad_()
    opts = LogpsOptions(**{**SMALL_BLOCKS.__dict__, "filter_eps": 1e-30 if skipping else None})
    out = fused_sequence_logps(hidden, weight, labels, backend="triton", options=opts, check_values=False)
    (dh,) = torch.autograd.grad(out.sum(), [hidden])
    dead = labels == -100
    assert (dh[dead] == 0).all()


# --------------------------------------------------------------------------------------- randomized


@st.composite
def _cases(draw):
    rows = 2 * draw(st.integers(1, 2))
    seq, hdim, vocab = draw(st.integers(3, 17)), draw(st.integers(4, 33)), draw(st.integers(2, 70))
    return dict(rows=rows, seq=seq, hdim=hdim, vocab=vocab,
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                bias=draw(st.booleans()), softcap=draw(st.sampled_from([None, 2.0])), shift=draw(st.booleans()),
                logit_scale=draw(st.sampled_from([1.0, 0.5])),
                average=draw(st.booleans()), strided=draw(st.booleans()), memory=draw(st.sampled_from(["fast", "lean"])),
                chunks=draw(st.sampled_from([(None, None), (5, 7), (1, 1)])), seed=draw(st.integers(0, 10_000)))


def _differential(backend, case):
    g = torch.Generator().manual_seed(case["seed"])
    rows, seq, hdim, vocab = case["rows"], case["seq"], case["hdim"], case["vocab"]
    hidden = torch.randn(rows, seq, hdim, generator=g).to(case["dtype"])
    weight = (torch.randn(vocab, hdim, generator=g) * 2 / hdim**0.5).to(case["dtype"])
    bias = (torch.randn(vocab, generator=g) * 0.5).to(case["dtype"]) if case["bias"] else None
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.rand(rows, seq, generator=g) < 0.3
    mask[:, 1 if case["shift"] else 0] = False  # every row keeps a live label
    labels = labels.masked_fill(mask, -100)
    if case["strided"]:
        hidden, bias = _strided(hidden), _strided(bias) if bias is not None else None
        weight = weight.T.contiguous().T
    tc, vc = case["chunks"]
    opts = LogpsOptions(fwd_block_m=16, fwd_block_n=16, fwd_block_k=16, bwd_block_m=16, bwd_block_n=16,
                        bwd_block_k=16, bwd_group_m=2, memory=case["memory"], chunk_tokens=tc, chunk_vocab=vc)
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    kw = dict(softcap=case["softcap"], shift=case["shift"], average=case["average"], logit_scale=case["logit_scale"])
    out = fused_sequence_logps(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None,
                               backend=backend, options=opts, **kw)
    up = torch.randn(rows, generator=g)
    grads = torch.autograd.grad((out * up).sum(), leaves)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference_sequence_logps(l64[0], l64[1], labels, bias=l64[2] if bias is not None else None, **kw)
    ref_grads = torch.autograd.grad((ref * up).sum(), l64)
    logp_tol, grad_tol = (1e-5, 1e-4) if case["dtype"] == torch.float32 else (1e-4, 2e-2)
    assert rel_err(out, ref) < logp_tol, (case, rel_err(out, ref))
    for name, a, b in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert rel_err(a, b) < grad_tol, (case, name, rel_err(a, b))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=_cases())
def test_randomized_torch_backend_matches_fp64(case):
    _differential("torch", case)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=_cases())
def test_randomized_triton_backend_matches_fp64(case):
    _differential("triton", case)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=_cases())
def test_randomized_cublas_path_matches_fp64(case):
    with pytest.MonkeyPatch.context() as mp:
        cublas_on_cpu(mp)
        _differential("cublas", case)
