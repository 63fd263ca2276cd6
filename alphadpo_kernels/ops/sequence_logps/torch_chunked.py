"""Plain-torch backend: the fused math chunked over tokens and vocabulary under a memory budget.

Nothing of size ``tokens × V`` is allocated: the forward keeps an online log-sum-exp per token across
vocabulary chunks, and the backward recomputes each ``[chunk_tokens, chunk_vocab]`` logit block, turns it
into ``dz = g · (onehot − softmax)`` (times the soft-cap derivative) and folds it into ``dH`` and ``dW``
at once. Only live tokens (label != ignore_index) are visited, which skips prompts and padding.

The loops run vocabulary-outer so that each ``dW`` chunk is accumulated in float32 over every token and
written once in the weight's dtype; ``dH`` is accumulated in one float32 ``[N, H]`` buffer (returned as is
for float32 inputs, cast once otherwise).

The same loops serve two backends: ``torch`` (float32 GEMMs on upcast chunks, with the compiled CPU epilogue
when it is built, else plain torch) and ``cublas`` (GEMMs in the input dtype with float32 output through
cuBLAS, and the CUDA epilogue; see cublas_chunked.py).

Backend contract (shared with the Triton backend): ``targets`` is ``[N]`` int64 with ``-1`` for dead
tokens; ``forward`` returns float32 ``(token_logps [N], lse [N])`` whose dead-token entries are
unspecified (the caller masks them); ``backward`` takes the per-token upstream gradient ``g [N]`` (zero at
dead tokens) and returns ``dH`` with zero rows at dead tokens, whatever their hidden states hold.
"""

from __future__ import annotations

import torch

from ... import _extension
from .options import LogpsOptions


def _chunk_sizes(n_live: int, vocab: int, hdim: int, opts: LogpsOptions) -> tuple[int, int]:
    budget = opts.torch_budget_bytes(vocab, hdim)
    vc = opts.chunk_vocab or max(128, int(budget / 2 / (4 * hdim)))
    vc = min(vc, vocab)
    # z, p/dz and one temporary per element of the logit block, all float32.
    tc = opts.chunk_tokens or max(16, int(budget / 2 / (vc * 4 * 3)))
    return max(1, min(tc, max(n_live, 1))), vc


# ----------------------------------------------------------------------------------------------- epilogues
# What happens to a float32 logits chunk once the GEMM has produced it. Three interchangeable versions:
# plain torch (any device), the C++/OpenMP extension (CPU) and the CUDA extension (backend="cublas").


class TorchEpilogue:
    @staticmethod
    def lse_update(z, t, vs, softcap, m, s, tz):
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        ve = vs + z.shape[1]
        m_new = torch.maximum(m, z.amax(1))
        s.copy_(s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1))
        m.copy_(m_new)
        inside = (t >= vs) & (t < ve)
        picked = z.gather(1, (t - vs).clamp(0, ve - vs - 1)[:, None]).squeeze(1)
        tz += torch.where(inside, picked, torch.zeros_like(picked))

    @staticmethod
    def grad_logits(z, t, vs, softcap, lse, g):
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        ve = vs + z.shape[1]
        dz = torch.exp(z - lse[:, None]).mul_(-g[:, None])
        inside = (t >= vs) & (t < ve)
        col = (t - vs).clamp(0, ve - vs - 1)[:, None]
        dz.scatter_add_(1, col, torch.where(inside, g, torch.zeros_like(g))[:, None])
        if softcap is not None:
            dz.mul_(1.0 - (z / softcap) ** 2)
        return dz


class ExtensionEpilogue:
    lse_update = staticmethod(_extension.lse_update)
    grad_logits = staticmethod(_extension.grad_logits)


def pick_epilogue(device: torch.device, opts: LogpsOptions):
    """The compiled CPU epilogue when it is built (and not switched off), else plain torch."""
    if device.type == "cpu" and opts.use_extension and _extension.cpu_module() is not None:
        return ExtensionEpilogue
    return TorchEpilogue


# ----------------------------------------------------------------------------------------------- GEMMs


class UpcastGemm:
    """torch backend: float32 GEMMs on upcast chunks (exact on any device)."""

    @staticmethod
    def mm(a, b):
        return a.float() @ b.float()

    @staticmethod
    def operand(dz, dtype):
        return dz


class NativeGemm:
    """cublas backend: GEMMs in the input dtype with float32 output (fp32 accumulation, z never rounded);
    dz is rounded to the input dtype for the two gradient GEMMs, as a bf16 GEMM would see it."""

    @staticmethod
    def mm(a, b):
        if a.dtype == torch.float32:
            return a @ b
        return torch.mm(a, b, out_dtype=torch.float32)

    @staticmethod
    def operand(dz, dtype):
        return dz.to(dtype)


def _logit_block(hc, wc, bc, gemm):
    z = gemm.mm(hc, wc.T)
    if bc is not None:
        z += bc.float()
    return z


def forward(hidden2d, weight, bias, targets, opts: LogpsOptions, *, epilogue=None, gemm=UpcastGemm):
    n_tok, hdim = hidden2d.shape
    vocab = weight.shape[0]
    epilogue = epilogue or pick_epilogue(hidden2d.device, opts)
    live_idx = (targets >= 0).nonzero().squeeze(1)
    n_live = live_idx.numel()
    tgt = targets.index_select(0, live_idx)
    m = torch.full((n_live,), float("-inf"), device=hidden2d.device)
    s = torch.zeros(n_live, device=hidden2d.device)
    tz = torch.zeros(n_live, device=hidden2d.device)
    tc, vc = _chunk_sizes(n_live, vocab, hdim, opts)
    for vs in range(0, vocab, vc):
        ve = min(vs + vc, vocab)
        wc = weight[vs:ve]
        bc = bias[vs:ve] if bias is not None else None
        for ts in range(0, n_live, tc):
            te = min(ts + tc, n_live)
            hc = hidden2d.index_select(0, live_idx[ts:te])
            z = _logit_block(hc, wc, bc, gemm)
            epilogue.lse_update(z, tgt[ts:te], vs, opts.softcap, m[ts:te], s[ts:te], tz[ts:te])
    lse_live = m + torch.log(s)
    lse = torch.zeros(n_tok, device=hidden2d.device)
    token_logps = torch.zeros(n_tok, device=hidden2d.device)
    lse.index_copy_(0, live_idx, lse_live)
    token_logps.index_copy_(0, live_idx, tz - lse_live)
    return token_logps, lse


def backward(hidden2d, weight, bias, targets, lse, g, opts: LogpsOptions, need_dh, need_dw, need_db, *,
             epilogue=None, gemm=UpcastGemm):
    n_tok, hdim = hidden2d.shape
    vocab = weight.shape[0]
    epilogue = epilogue or pick_epilogue(hidden2d.device, opts)
    live_idx = (targets >= 0).nonzero().squeeze(1)
    n_live = live_idx.numel()
    tgt = targets.index_select(0, live_idx)
    g_live = g.index_select(0, live_idx).float()
    lse_live = lse.index_select(0, live_idx)
    dh = torch.zeros(n_tok, hdim, device=hidden2d.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty(vocab, device=weight.device) if need_db else None
    tc, vc = _chunk_sizes(n_live, vocab, hdim, opts)
    for vs in range(0, vocab, vc):
        ve = min(vs + vc, vocab)
        wc = weight[vs:ve]
        bc = bias[vs:ve] if bias is not None else None
        dwc = torch.zeros(ve - vs, hdim, device=weight.device) if need_dw else None
        dbc = torch.zeros(ve - vs, device=weight.device) if need_db else None
        for ts in range(0, n_live, tc):
            te = min(ts + tc, n_live)
            idx = live_idx[ts:te]
            hc = hidden2d.index_select(0, idx)
            z = _logit_block(hc, wc, bc, gemm)
            dz = epilogue.grad_logits(z, tgt[ts:te], vs, opts.softcap, lse_live[ts:te], g_live[ts:te])
            dz_op = gemm.operand(dz, wc.dtype)
            if need_dh:
                dh.index_add_(0, idx, gemm.mm(dz_op, wc))
            if need_dw:
                dwc += gemm.mm(dz_op.T, hc)
            if need_db:
                dbc += dz.sum(0)
        if need_dw:
            dw[vs:ve] = dwc.to(weight.dtype)
        if need_db:
            db[vs:ve] = dbc
    if need_dh and dh.dtype != hidden2d.dtype:
        dh = dh.to(hidden2d.dtype)
    return dh, dw, db
