"""Plain-torch backend: the fused math chunked over tokens and vocabulary under a memory budget.

Nothing of size ``tokens × V`` is allocated: the forward keeps an online log-sum-exp per token across
vocabulary chunks, and the backward recomputes each ``[chunk_tokens, chunk_vocab]`` logit block, turns it
into ``dz = g · (onehot − softmax)`` (times the soft-cap derivative) and folds it into ``dH`` and ``dW``
at once. Only live tokens (label != ignore_index) are visited, which skips prompts and padding.

The loops run vocabulary-outer so that each ``dW`` chunk is accumulated in float32 over every token and
written once in the weight's dtype; ``dH`` is accumulated in one float32 ``[N, H]`` buffer (returned as is
for float32 inputs, cast once otherwise).

Backend contract (shared with the Triton backend): ``targets`` is ``[N]`` int64 with ``-1`` for dead
tokens; ``forward`` returns float32 ``(token_logps [N], lse [N])`` whose dead-token entries are
unspecified (the caller masks them); ``backward`` takes the per-token upstream gradient ``g [N]`` (zero at
dead tokens) and returns ``dH`` with zero rows at dead tokens, whatever their hidden states hold.
"""

from __future__ import annotations

import torch

from .options import LogpsOptions


def _chunk_sizes(n_live: int, vocab: int, hdim: int, opts: LogpsOptions) -> tuple[int, int]:
    budget = opts.torch_budget_bytes(vocab, hdim)
    vc = opts.chunk_vocab or max(128, int(budget / 2 / (4 * hdim)))
    vc = min(vc, vocab)
    # z, p/dz and one temporary per element of the logit block, all float32.
    tc = opts.chunk_tokens or max(16, int(budget / 2 / (vc * 4 * 3)))
    return max(1, min(tc, max(n_live, 1))), vc


def _logit_block(hc, wc, bc, softcap):
    z = hc @ wc.T
    if bc is not None:
        z = z + bc
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def forward(hidden2d, weight, bias, targets, opts: LogpsOptions):
    n_tok, hdim = hidden2d.shape
    vocab = weight.shape[0]
    live_idx = (targets >= 0).nonzero().squeeze(1)
    n_live = live_idx.numel()
    tgt = targets.index_select(0, live_idx)
    m = torch.full((n_live,), float("-inf"), device=hidden2d.device)
    s = torch.zeros(n_live, device=hidden2d.device)
    tz = torch.zeros(n_live, device=hidden2d.device)
    tc, vc = _chunk_sizes(n_live, vocab, hdim, opts)
    for vs in range(0, vocab, vc):
        ve = min(vs + vc, vocab)
        wc = weight[vs:ve].float()
        bc = bias[vs:ve].float() if bias is not None else None
        for ts in range(0, n_live, tc):
            te = min(ts + tc, n_live)
            hc = hidden2d.index_select(0, live_idx[ts:te]).float()
            z = _logit_block(hc, wc, bc, opts.softcap)
            m_new = torch.maximum(m[ts:te], z.amax(1))
            s[ts:te] = s[ts:te] * torch.exp(m[ts:te] - m_new) + torch.exp(z - m_new[:, None]).sum(1)
            m[ts:te] = m_new
            t = tgt[ts:te]
            inside = (t >= vs) & (t < ve)
            picked = z.gather(1, (t - vs).clamp(0, ve - vs - 1)[:, None]).squeeze(1)
            tz[ts:te] += torch.where(inside, picked, torch.zeros_like(picked))
    lse_live = m + torch.log(s)
    lse = torch.zeros(n_tok, device=hidden2d.device)
    token_logps = torch.zeros(n_tok, device=hidden2d.device)
    lse.index_copy_(0, live_idx, lse_live)
    token_logps.index_copy_(0, live_idx, tz - lse_live)
    return token_logps, lse


def backward(hidden2d, weight, bias, targets, lse, g, opts: LogpsOptions, need_dh, need_dw, need_db):
    n_tok, hdim = hidden2d.shape
    vocab = weight.shape[0]
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
        wc = weight[vs:ve].float()
        bc = bias[vs:ve].float() if bias is not None else None
        dwc = torch.zeros(ve - vs, hdim, device=weight.device) if need_dw else None
        dbc = torch.zeros(ve - vs, device=weight.device) if need_db else None
        for ts in range(0, n_live, tc):
            te = min(ts + tc, n_live)
            idx = live_idx[ts:te]
            hc = hidden2d.index_select(0, idx).float()
            z = _logit_block(hc, wc, bc, opts.softcap)
            gc = g_live[ts:te]
            dz = torch.exp(z - lse_live[ts:te, None]).mul_(-gc[:, None])
            t = tgt[ts:te]
            inside = (t >= vs) & (t < ve)
            col = (t - vs).clamp(0, ve - vs - 1)[:, None]
            dz.scatter_add_(1, col, torch.where(inside, gc, torch.zeros_like(gc))[:, None])
            if opts.softcap is not None:
                dz.mul_(1.0 - (z / opts.softcap) ** 2)
            if need_dh:
                dh.index_add_(0, idx, dz @ wc)
            if need_dw:
                dwc += dz.T @ hc
            if need_db:
                dbc += dz.sum(0)
        if need_dw:
            dw[vs:ve] = dwc.to(weight.dtype)
        if need_db:
            db[vs:ve] = dbc
    if need_dh and dh.dtype != hidden2d.dtype:
        dh = dh.to(hidden2d.dtype)
    return dh, dw, db
