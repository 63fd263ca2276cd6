"""Loss heads and the module against an independent plain implementation of the loss in docs/design.md §1."""

from __future__ import annotations

import math

import pytest
import torch

from alphadpo_kernels import FusedAlphaDPOLoss, fused_alpha_dpo_loss, reference_sequence_logps
from alphadpo_kernels.losses import alpha_dpo_head, batch_margin_stats
from conftest import rel_err
from helpers import SMALL_BLOCKS, make_inputs


class PlainAlphaDPO:
    """docs/design.md §1 written out with Python floats and math, step by step (independent of the package)."""

    def __init__(self, beta, gamma_beta_ratio, alpha, eps=1e-8):
        self.beta, self.gbr, self.alpha, self.eps = beta, gamma_beta_ratio, alpha, eps
        self.c1 = self.c2 = 0.0

    def step(self, pc, pr, rc, rr, update=True):
        n = len(pc)
        m = [(pc[i] - pr[i]) - (rc[i] - rr[i]) for i in range(n)]
        if update:
            mean = sum(m) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in m) / (n - 1)) if n > 1 else 0.0
            self.c1 = 0.9 * self.c1 + 0.1 * mean
            self.c2 = 0.9 * self.c2 + 0.1 * std
        losses, grads = [], []
        for i in range(n):
            norm = (m[i] - self.c1) / self.c2 if self.c2 > self.eps else 0.0
            z = (pc[i] - pr[i]) - (self.alpha * norm + self.gbr)
            losses.append(math.log1p(math.exp(-self.beta * z)))
            # d loss_mean / d Δπ_i = −β σ(−β z) / n
            grads.append(-self.beta / (1 + math.exp(self.beta * z)) / n)
        chosen = [self.beta * (pc[i] - self.alpha * (pc[i] - rc[i])) for i in range(n)]
        rejected = [self.beta * (pr[i] - self.alpha * (pr[i] - rr[i])) for i in range(n)]
        return sum(losses) / n, grads, chosen, rejected


def _logps(pairs, gen):
    return [(-2.0 + 0.5 * torch.randn(pairs, generator=gen, dtype=torch.float64)) for _ in range(4)]


@pytest.mark.parametrize("beta,gbr,alpha", [(2.5, 0.6, 0.2), (10.0, 0.4, 0.05), (2.5, 0.15, 0.05)])
def test_alpha_dpo_head_matches_plain_spec_over_steps(beta, gbr, alpha):
    gen = torch.Generator().manual_seed(int(beta * 100 + alpha * 1000))
    plain = PlainAlphaDPO(beta, gbr, alpha)
    c1 = c2 = torch.zeros(1, dtype=torch.float64)
    for step in range(6):
        pc, pr, rc, rr = _logps(5, gen)
        pc.requires_grad_()
        pr.requires_grad_()
        out = alpha_dpo_head(pc, pr, rc, rr, beta=beta, gamma_beta_ratio=gbr, alpha=alpha, margin_mean=c1,
                             margin_std=c2)
        c1, c2 = out.margin_mean, out.margin_std
        loss = out.losses.mean()
        dpc, dpr = torch.autograd.grad(loss, [pc, pr])
        ref_loss, ref_grads, ref_ch, ref_rj = plain.step(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())
        assert abs(loss.item() - ref_loss) <= 1e-12 * max(1.0, abs(ref_loss)), step
        assert torch.allclose(dpc, torch.tensor(ref_grads, dtype=torch.float64), rtol=1e-10, atol=0)
        assert torch.allclose(dpr, -torch.tensor(ref_grads, dtype=torch.float64), rtol=1e-10, atol=0)
        assert torch.allclose(out.chosen_rewards, torch.tensor(ref_ch, dtype=torch.float64), rtol=1e-12)
        assert torch.allclose(out.rejected_rewards, torch.tensor(ref_rj, dtype=torch.float64), rtol=1e-12)
        assert abs(c1.item() - plain.c1) < 1e-12 and abs(c2.item() - plain.c2) < 1e-12


def test_alpha_zero_is_simpo():
    gen = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = _logps(4, gen)
    out = alpha_dpo_head(pc, pr, rc, rr, beta=2.0, gamma_beta_ratio=0.5, alpha=0.0,
                         margin_mean=torch.zeros(1), margin_std=torch.zeros(1))
    simpo = -torch.nn.functional.logsigmoid(2.0 * (pc - pr - 0.5))
    assert torch.allclose(out.losses, simpo)


def test_degenerate_cases_stay_finite():
    # Step 1 with policy == reference: every M is 0, so c2 = 0: the normalised term is 0 (SimPO limit).
    pc = torch.tensor([-1.0, -2.0, -1.5], requires_grad=True)
    pr = torch.tensor([-1.2, -1.9, -1.0], requires_grad=True)
    out = alpha_dpo_head(pc, pr, pc.detach(), pr.detach(), beta=2.5, gamma_beta_ratio=0.6, alpha=0.2,
                         margin_mean=torch.zeros(1), margin_std=torch.zeros(1))
    simpo = -torch.nn.functional.logsigmoid(2.5 * (pc - pr - 0.6))
    assert torch.allclose(out.losses, simpo)
    assert out.margin_std.item() == 0.0
    g = torch.autograd.grad(out.losses.mean(), [pc, pr])
    assert all(torch.isfinite(t).all() for t in g)
    # A gathered batch of one pair contributes std 0, not NaN.
    mean, std = batch_margin_stats(torch.tensor([0.3]))
    assert std.item() == 0.0 and mean.item() == pytest.approx(0.3)
    one = alpha_dpo_head(pc[:1], pr[:1], pc[:1].detach() + 0.1, pr[:1].detach(), beta=2.5, gamma_beta_ratio=0.6,
                         alpha=0.2, margin_mean=torch.zeros(1), margin_std=torch.zeros(1))
    assert torch.isfinite(one.losses).all() and torch.isfinite(one.margin_std).all()


@pytest.mark.parametrize("loss_type", ["alpha_dpo", "simpo", "sigmoid", "ipo"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_loss_matches_reference_path(loss_type, backend, device):
    """Loss, rewards, metrics and gradients of the fused path against fp64 full logits + the same head."""
    hidden, weight, labels, bias = make_inputs(rows=6, bias=True, seed=31, device=device)
    hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    ref_c, ref_r = -2.0 + torch.rand(3, device=device), -2.5 + torch.rand(3, device=device)
    kw = dict(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2, loss_type=loss_type, shift=True)
    state = dict(margin_mean=torch.tensor([0.05], device=device), margin_std=torch.tensor([0.4], device=device))
    out = fused_alpha_dpo_loss(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                               backend=backend, options=SMALL_BLOCKS, **state, **kw)
    grads = torch.autograd.grad(out.loss, [hidden, weight, bias])

    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    logps = reference_sequence_logps(h64, w64, labels, bias=b64, shift=True)
    ref = fused_reference_head(logps, ref_c.double(), ref_r.double(), state, **kw)
    ref_grads = torch.autograd.grad(ref["loss"], [h64, w64, b64])

    assert rel_err(out.loss, ref["loss"]) < 1e-4
    assert rel_err(out.chosen_logps, logps[:3]) < 1e-5 and rel_err(out.rejected_logps, logps[3:]) < 1e-5
    assert rel_err(out.chosen_rewards, ref["chosen"]) < 1e-4
    assert rel_err(out.rejected_rewards, ref["rejected"]) < 1e-4
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4
    expected_keys = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                     "logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected", "nonfinite_pairs"}
    assert set(out.metrics) == expected_keys and out.metrics["nonfinite_pairs"] == 0
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(
        (ref["chosen"] > ref["rejected"]).double().mean().item())


def fused_reference_head(logps, ref_c, ref_r, state, *, beta, gamma_beta_ratio, alpha, loss_type, shift):
    """The released trainer's dpo_loss, written out on fp64 log-probs."""
    p = logps.shape[0] // 2
    pc, pr = logps[:p], logps[p:]
    pi, rf = pc - pr, ref_c - ref_r
    if loss_type == "alpha_dpo":
        m = (pi - rf).detach()
        c1 = 0.9 * state["margin_mean"].double() + 0.1 * m.mean()
        c2 = 0.9 * state["margin_std"].double() + 0.1 * m.std()
        z = pi - (alpha * (m - c1) / c2 + gamma_beta_ratio).detach()
        loss = -torch.nn.functional.logsigmoid(beta * z).mean()
        chosen = beta * (pc - alpha * (pc - ref_c)).detach()
        rejected = beta * (pr - alpha * (pr - ref_r)).detach()
        return dict(loss=loss, chosen=chosen, rejected=rejected)
    if loss_type == "simpo":
        loss = -torch.nn.functional.logsigmoid(beta * (pi - gamma_beta_ratio)).mean()
    elif loss_type == "sigmoid":
        loss = -torch.nn.functional.logsigmoid(beta * (pi - rf)).mean()
    else:
        loss = ((pi - rf - 1 / (2 * beta)) ** 2).mean()
    return dict(loss=loss, chosen=beta * (pc - ref_c).detach(), rejected=beta * (pr - ref_r).detach())


def test_module_matches_functional_and_updates_only_in_training(device):
    hidden, weight, labels, _ = make_inputs(rows=4, seed=37, device=device)
    module = FusedAlphaDPOLoss(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2).to(device)
    mean, std = None, None
    for step in range(3):
        ref_c, ref_r = -3 + torch.rand(2, device=device), -3 + torch.rand(2, device=device)
        out_m = module(hidden, weight, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, backend="torch")
        out_f = fused_alpha_dpo_loss(hidden, weight, labels, margin_mean=mean, margin_std=std, ref_chosen_logps=ref_c,
                                     ref_rejected_logps=ref_r, backend="torch")
        mean, std = out_f.margin_mean, out_f.margin_std
        assert torch.equal(out_m.loss, out_f.loss)
        assert torch.equal(module.margin_mean, mean) and torch.equal(module.margin_std, std)
    module.eval()
    before = module.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    module(hidden, weight, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, backend="torch")
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_state_dict_round_trip(device):
    hidden, weight, labels, _ = make_inputs(rows=4, seed=41, device=device)
    a = FusedAlphaDPOLoss()
    for _ in range(2):
        a(hidden, weight, labels, ref_chosen_logps=torch.rand(2) - 3, ref_rejected_logps=torch.rand(2) - 3)
    sd = a.state_dict()
    assert set(sd) == {"margin_mean", "margin_std"} and sd["margin_std"].item() > 0
    b = FusedAlphaDPOLoss()
    b.load_state_dict(sd)
    ref_c, ref_r = torch.rand(2) - 3, torch.rand(2) - 3
    assert torch.equal(a(hidden, weight, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r).loss,
                       b(hidden, weight, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r).loss)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reference_from_hidden_equals_given_logps(backend, device):
    hidden, weight, labels, _ = make_inputs(rows=4, seed=43, device=device)
    ref_hidden, ref_weight = hidden + 0.1 * torch.randn_like(hidden), weight * 0.9
    with torch.no_grad():
        ref = reference_sequence_logps(ref_hidden, ref_weight, labels, compute_dtype=torch.float32)
    kw = dict(backend=backend, margin_mean=torch.tensor([0.1]), margin_std=torch.tensor([0.3]))
    a = fused_alpha_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, **kw)
    b = fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:], **kw)
    assert rel_err(a.ref_chosen_logps, ref[:2]) < 1e-5
    assert rel_err(a.loss, b.loss) < 1e-4


def test_simpo_needs_no_reference(device):
    hidden, weight, labels, _ = make_inputs(rows=4, seed=47, device=device)
    out = fused_alpha_dpo_loss(hidden, weight, labels, loss_type="simpo", beta=2.0, gamma_beta_ratio=0.5)
    assert "logps/ref_chosen" not in out.metrics
    assert torch.allclose(out.chosen_rewards, 2.0 * out.chosen_logps)


def test_margin_state_accepts_numbers_and_scalars(device):
    hidden, weight, labels, _ = make_inputs(rows=4, seed=53, device=device)
    refs = dict(ref_chosen_logps=torch.tensor([-3.0, -2.5]), ref_rejected_logps=torch.tensor([-2.0, -3.5]))
    a = fused_alpha_dpo_loss(hidden, weight, labels, margin_mean=0.05, margin_std=0.4, **refs)
    b = fused_alpha_dpo_loss(hidden, weight, labels, margin_mean=torch.tensor(0.05), margin_std=torch.tensor([0.4]),
                             **refs)
    assert torch.equal(a.loss, b.loss) and a.margin_mean.shape == (1,)
    with pytest.raises(ValueError, match="margin_std must be a number or a floating tensor with one element"):
        fused_alpha_dpo_loss(hidden, weight, labels, margin_mean=0.0, margin_std=torch.zeros(2), **refs)
