"""End to end over several training steps: the module on hidden states against an fp64 transcription of
docs/design.md §1 (full logits, length-normalised log-probs, running margin statistics), at the tolerances of
docs/design.md §5."""

from __future__ import annotations

import pytest
import torch

from alphadpo_kernels import FusedAlphaDPOLoss
from conftest import rel_err
from helpers import SMALL_BLOCKS, make_inputs

BETA, GBR, ALPHA = 2.5, 0.6, 0.2


class Fp64Spec:
    def __init__(self):
        self.c1 = torch.zeros(1, dtype=torch.float64)
        self.c2 = torch.zeros(1, dtype=torch.float64)

    def logps(self, hidden, weight, labels, softcap):
        logits = hidden.double() @ weight.double().T
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        y = labels[:, 1:]
        logits = logits[:, :-1]
        live = y != -100
        tok = torch.gather(logits.log_softmax(-1), 2, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (tok * live).sum(-1) / live.sum(-1)

    def step(self, logps, ref_c, ref_r):
        p = logps.shape[0] // 2
        pc, pr = logps[:p], logps[p:]
        pi = pc - pr
        m = (pi - (ref_c - ref_r)).detach()
        self.c1 = 0.9 * self.c1 + 0.1 * m.mean()
        self.c2 = 0.9 * self.c2 + 0.1 * (m.std() if p > 1 else torch.zeros((), dtype=torch.float64))
        norm = (m - self.c1) / self.c2 if self.c2.item() > 1e-8 else torch.zeros_like(m)
        z = pi - (ALPHA * norm + GBR).detach()
        loss = -torch.nn.functional.logsigmoid(BETA * z).mean()
        rewards = (BETA * (pc - ALPHA * (pc - ref_c)).detach(), BETA * (pr - ALPHA * (pr - ref_r)).detach())
        return loss, rewards


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, (1e-4, 1e-5, 1e-4, 1e-4)),
                                       (torch.bfloat16, (2e-3, 1e-4, 2e-3, 2e-2))], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
def test_three_steps_against_fp64_spec(backend, dtype, tol, softcap):
    loss_tol, logp_tol, reward_tol, grad_tol = tol
    module = FusedAlphaDPOLoss(beta=BETA, gamma_beta_ratio=GBR, alpha=ALPHA, softcap=softcap, shift=True,
                               options=SMALL_BLOCKS)
    spec = Fp64Spec()
    for step in range(3):
        hidden, weight, labels, _ = make_inputs(rows=6, seq=17, hdim=24, vocab=71, dtype=dtype, seed=100 + step)
        g = torch.Generator().manual_seed(200 + step)
        ref_c, ref_r = -2 - torch.rand(3, generator=g, dtype=torch.float64), -2 - torch.rand(3, generator=g,
                                                                                              dtype=torch.float64)
        hidden.requires_grad_(), weight.requires_grad_()
        out = module(hidden, weight, labels, ref_chosen_logps=ref_c.float(), ref_rejected_logps=ref_r.float(),
                     backend=backend)
        dh, dw = torch.autograd.grad(out.loss, [hidden, weight])
        h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        logps = spec.logps(h64, w64, labels, softcap)
        loss, (rc, rr) = spec.step(logps, ref_c, ref_r)
        ref_dh, ref_dw = torch.autograd.grad(loss, [h64, w64])
        assert rel_err(out.loss, loss) < loss_tol, step
        assert rel_err(out.chosen_logps, logps[:3]) < logp_tol and rel_err(out.rejected_logps, logps[3:]) < logp_tol
        assert rel_err(out.chosen_rewards, rc) < reward_tol and rel_err(out.rejected_rewards, rr) < reward_tol
        assert rel_err(dh, ref_dh) < grad_tol and rel_err(dw, ref_dw) < grad_tol, step
        assert abs(module.margin_std.item() - spec.c2.item()) <= 1e-4 * abs(spec.c2.item()) + 1e-7
