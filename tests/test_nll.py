"""The NLL (RPO) term on the chosen responses, from the same fused pass as the pair loss: ``nll_weight`` equals a
separate ``F.cross_entropy`` over the chosen tokens (TRL's ``loss_type=[..., "sft"]`` term, token-averaged over
the batch) in loss and gradients, padded and packed, mean or summed log-probs, torch and Triton backends."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alphadpo_kernels import FusedAlphaDPOLoss, fused_alpha_dpo_loss, reference_sequence_logps
from alphadpo_kernels.losses.heads import chosen_nll
from conftest import rel_err
from helpers import SMALL_BLOCKS, make_inputs

ROWS, SEQ, P = 4, 15, 2
LENGTHS = [15, 11, 13, 9]  # each sequence's length when packed (its padded row holds no live label beyond it)


def _inputs(seed=0):
    hidden, weight, labels, bias = make_inputs(rows=ROWS, seq=SEQ, hdim=24, vocab=61, bias=True, seed=seed)
    for r, n in enumerate(LENGTHS):
        labels[r, n:] = -100
    return hidden, weight, labels, bias


def _chosen_cross_entropy(hidden, weight, labels, bias):
    """float64 cross-entropy with ``reduction="mean"`` over every scored token of the chosen rows (shifted)."""
    logits = hidden[:P, :-1] @ weight.T + bias
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:P, 1:].reshape(-1), ignore_index=-100)


def _reference(hidden, weight, labels, bias, *, nll_weight, average, beta, gamma):
    """SimPO on float64 full-logits log-probs plus ``nll_weight`` times the separate cross-entropy."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logps = reference_sequence_logps(leaves[0], leaves[1], labels, bias=leaves[2], shift=True, average=average)
    pair = -F.logsigmoid(beta * (logps[:P] - logps[P:] - gamma)).mean()
    nll = _chosen_cross_entropy(*leaves[:2], labels, leaves[2])
    loss = pair + nll_weight * nll
    return loss, nll, torch.autograd.grad(loss, leaves)


def _packed(hidden, labels):
    h = torch.cat([hidden[r, :n] for r, n in enumerate(LENGTHS)])
    lab = torch.cat([labels[r, :n] for r, n in enumerate(LENGTHS)])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return h, lab, cu


def _unpack(grad_h):
    out = torch.zeros(ROWS, SEQ, grad_h.shape[-1], dtype=grad_h.dtype)
    start = 0
    for r, n in enumerate(LENGTHS):
        out[r, :n] = grad_h[start:start + n]
        start += n
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_nll_term_equals_a_separate_cross_entropy(backend, average, packed):
    hidden, weight, labels, bias = _inputs()
    beta, gamma, w = 2.0, 0.5, 0.7
    ref_loss, ref_nll, ref_grads = _reference(hidden, weight, labels, bias, nll_weight=w, average=average,
                                              beta=beta, gamma=gamma)
    h, lab, cu = _packed(hidden, labels) if packed else (hidden, labels, None)
    leaves = [t.clone().requires_grad_() for t in (h, weight, bias)]
    out = fused_alpha_dpo_loss(leaves[0], leaves[1], lab, bias=leaves[2], loss_type="simpo", beta=beta,
                               gamma_beta_ratio=gamma, average_log_prob=average, shift=True, cu_seqlens=cu,
                               backend=backend, options=SMALL_BLOCKS, nll_weight=w)
    grads = torch.autograd.grad(out.loss, leaves)
    assert rel_err(out.loss, ref_loss) < 1e-5, (float(out.loss), float(ref_loss))
    assert rel_err(out.metrics["nll_loss"], ref_nll) < 1e-5
    got_dh = _unpack(grads[0]) if packed else grads[0]
    for name, g, r in zip(("hidden", "weight", "bias"), (got_dh, *grads[1:]), ref_grads):
        assert rel_err(g, r) < 1e-4, (name, rel_err(g, r))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nll_is_one_op_call(backend, monkeypatch):
    """The term costs no second pass: the op is called once (and its backward once) with or without it."""
    from alphadpo_kernels.ops import sequence_logps as ops

    calls = []
    real = ops._SequenceLogps.apply

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops._SequenceLogps, "apply", counting)
    hidden, weight, labels, _ = _inputs()
    hidden.requires_grad_()
    rc, rr = torch.full((P,), -3.0), torch.full((P,), -3.5)
    out = fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, shift=True,
                               backend=backend, options=SMALL_BLOCKS, nll_weight=1.0)
    out.loss.backward()
    assert len(calls) == 1 and hidden.grad is not None and "nll_loss" in out.metrics


def test_nll_weight_zero_changes_nothing_and_module_matches_functional():
    hidden, weight, labels, _ = _inputs()
    rc, rr = torch.full((P,), -3.0), torch.full((P,), -3.5)
    kw = dict(ref_chosen_logps=rc, ref_rejected_logps=rr, backend="torch")
    base = fused_alpha_dpo_loss(hidden, weight, labels, shift=True, **kw)
    assert "nll_loss" not in base.metrics
    with_nll = fused_alpha_dpo_loss(hidden, weight, labels, shift=True, nll_weight=0.25, **kw)
    nll = _chosen_cross_entropy(hidden.double(), weight.double(), labels, torch.zeros(weight.shape[0]).double())
    assert float(with_nll.metrics["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    assert float(with_nll.loss) == pytest.approx(float(base.loss) + 0.25 * float(nll), rel=1e-5)
    # the α-DPO statistics do not see the term
    assert torch.equal(base.margin_mean, with_nll.margin_mean) and torch.equal(base.margin_std, with_nll.margin_std)

    module = FusedAlphaDPOLoss(shift=True, nll_weight=0.25)
    out = module(hidden, weight, labels, **kw)
    assert torch.equal(out.loss, with_nll.loss) and torch.equal(out.metrics["nll_loss"], with_nll.metrics["nll_loss"])


@pytest.mark.parametrize("average", [True, False])
def test_loss_from_logps_takes_the_token_counts(average):
    hidden, weight, labels, _ = _inputs()
    from alphadpo_kernels import fused_sequence_logps

    logps = fused_sequence_logps(hidden, weight, labels, shift=True, average=average, backend="torch")
    counts = (labels[:P, 1:] != -100).sum(1)
    rc, rr = torch.full((P,), -3.0), torch.full((P,), -3.5)
    module = FusedAlphaDPOLoss(loss_type="sigmoid", beta=0.1, average_log_prob=average, shift=True, nll_weight=2.0)
    out = module.loss_from_logps(logps[:P], logps[P:], rc, rr, chosen_token_counts=counts)
    nll = _chosen_cross_entropy(hidden.double(), weight.double(), labels, torch.zeros(weight.shape[0]).double())
    assert float(out.metrics["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    pair = -F.logsigmoid(0.1 * (logps[:P] - logps[P:] - rc + rr)).mean()
    assert float(out.loss) == pytest.approx(float(pair) + 2.0 * float(nll), rel=1e-5)
    with pytest.raises(ValueError, match="chosen_token_counts"):
        module.loss_from_logps(logps[:P], logps[P:], rc, rr)


def test_chosen_nll_is_token_averaged_over_the_batch():
    """Not the mean of per-sequence means: a long sequence weighs by its tokens (TRL's and Liger's definition)."""
    means, counts = torch.tensor([-1.0, -3.0]), torch.tensor([1, 3])
    assert float(chosen_nll(means, counts, average_log_prob=True)) == pytest.approx((1 + 9) / 4)
    assert float(chosen_nll(means * counts, counts, average_log_prob=False)) == pytest.approx((1 + 9) / 4)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, True, "1"])
def test_bad_nll_weight_is_refused(bad):
    with pytest.raises(ValueError, match="nll_weight"):
        FusedAlphaDPOLoss(nll_weight=bad)
    hidden, weight, labels, _ = _inputs()
    with pytest.raises(ValueError, match="nll_weight"):
        fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=torch.zeros(P),
                             ref_rejected_logps=torch.zeros(P), nll_weight=bad)


@pytest.mark.parametrize("packed", [False, True])
def test_nll_term_adds_no_host_sync(packed):
    """The token counts and the term stay on the device: the call makes the same syncs with and without it."""
    from alphadpo_kernels.ops.sequence_logps.instrument import count_host_syncs

    hidden, weight, labels, _ = _inputs()
    h, lab, cu = _packed(hidden, labels) if packed else (hidden, labels, None)
    rc, rr = torch.full((P,), -3.0), torch.full((P,), -3.5)
    ops = {}
    for w in (0.0, 1.0):
        leaf = h.clone().requires_grad_()
        with count_host_syncs() as log:
            out = fused_alpha_dpo_loss(leaf, weight, lab, ref_chosen_logps=rc, ref_rejected_logps=rr, shift=True,
                                       cu_seqlens=cu, backend="torch", nll_weight=w)
            out.loss.backward()
        ops[w] = log.ops
    assert ops[1.0] == ops[0.0]


@pytest.mark.parametrize("padding_free", [False, True])
def test_alphadpo_train_model_with_the_nll_term(padding_free):
    """``alphadpo-train``'s model (``PreferenceModel``) with ``FusedAlphaDPOLoss(nll_weight=...)``, padded and
    padding-free: loss and weight gradients equal SimPO plus the cross-entropy of the model's own logits."""
    pytest.importorskip("transformers")
    from alphadpo_kernels.train.data import PreferenceCollator
    from alphadpo_kernels.train.demo import build_demo_model
    from alphadpo_kernels.train.modeling import PreferenceModel

    policy = build_demo_model(20, seed=0).float()
    g = torch.Generator().manual_seed(1)
    items = []
    for i, (n_prompt, n_c, n_r) in enumerate(((3, 4, 6), (5, 7, 2))):
        prompt = torch.randint(3, 20, (n_prompt,), generator=g).tolist()
        c, r = (torch.randint(3, 20, (n,), generator=g).tolist() for n in (n_c, n_r))
        items.append(dict(index=i, chosen_input_ids=prompt + c, rejected_input_ids=prompt + r,
                          chosen_labels=[-100] * n_prompt + c, rejected_labels=[-100] * n_prompt + r))
    w = 0.5
    model = PreferenceModel(policy, FusedAlphaDPOLoss(loss_type="simpo", beta=2.0, gamma_beta_ratio=0.3, shift=True,
                                                      nll_weight=w), backend="torch")
    out = model(PreferenceCollator(0, padding_free=padding_free)(items))
    params = list(policy.parameters())
    grads = torch.autograd.grad(out.loss, params)

    padded = PreferenceCollator(0)(items)
    logits = policy(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.double()
    logps_tok = torch.log_softmax(logits[:, :-1], -1)
    labels = padded["labels"][:, 1:]
    live = labels != -100
    tok = logps_tok.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * live
    logps = tok.sum(1) / live.sum(1)
    pair = -F.logsigmoid(2.0 * (logps[:2] - logps[2:] - 0.3)).mean()
    nll = F.cross_entropy(logits[:2, :-1].reshape(-1, logits.shape[-1]), labels[:2].reshape(-1), ignore_index=-100)
    expect = pair + w * nll
    expect_grads = torch.autograd.grad(expect, params)
    assert float(out.loss) == pytest.approx(float(expect), rel=1e-5)
    assert float(out.metrics["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    for (p, _), a, b in zip(policy.named_parameters(), grads, expect_grads):
        assert rel_err(a, b) < 1e-4, (p, rel_err(a, b))
