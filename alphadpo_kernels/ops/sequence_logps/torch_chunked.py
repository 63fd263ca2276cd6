"""Plain-torch backend, and the pieces ``backend="cublas"`` shares with it: GEMM logits + an epilogue.

Nothing of size ``tokens × V`` is allocated. The forward computes float32 logit blocks of live tokens
(label != ignore_index) by GEMM (:func:`.gemm.mm_into`: float32 accumulation, logits never rounded below float32)
and folds them into an online log-sum-exp per token. The backward is the chunked driver of chunked_backward.py
with :class:`EpilogueGradLogits` as its ``dz`` producer: each chunk's float32 logits by GEMM, then the epilogue
turns them into ``dz`` in place.

Three interchangeable epilogues: plain torch (any device), the C++/OpenMP extension (CPU) and the CUDA extension
(``backend="cublas"``, which also writes ``dz`` once in the input dtype for the gradient GEMMs). The torch
backend keeps ``dz`` in float32 (its role: exact on any device, the readable twin of the kernels); cublas rounds
it to the input dtype, as the tensor-core GEMMs that consume it must.

Backend contract (shared with the Triton backend): ``targets`` is ``[N]`` int64 with ``-1`` for dead
tokens; ``forward`` returns float32 ``(token_logps [N], lse [N])`` whose dead-token entries are
unspecified (the caller masks them); ``backward`` takes the per-token upstream gradient ``g [N]`` (zero at
dead tokens) and returns ``dH`` with zero rows at dead tokens, whatever their hidden states hold.
"""

from __future__ import annotations

import torch

from ... import _extension
from .chunked_backward import cast_buffer, chunked_backward, operand_chunk
from .gemm import exact_matmul, mm_into
from .options import LogpsOptions

EPILOGUE_BLOCK_BYTES = 4 * 2**20  # row blocks of the plain-torch epilogue's temporaries, at most this ...
EPILOGUE_BLOCK_FRACTION = 8  # ... and at most 1/8 of the chunk's rows: its ≤ 4 temporaries stay ≤ half the chunk


def _chunk_sizes(n_live: int, vocab: int, hdim: int, opts: LogpsOptions) -> tuple[int, int]:
    """Forward blocks: an upcast weight chunk in half the budget, the float32 logit block and its epilogue
    temporaries (three per element) in the other half."""
    budget = opts.budget_bytes()
    vc = opts.chunk_vocab or max(128, int(budget / 2 / (4 * hdim)))
    vc = min(vc, vocab)
    tc = opts.chunk_tokens or max(16, int(budget / 2 / (vc * 4 * 3)))
    return max(1, min(tc, max(n_live, 1))), vc


# ----------------------------------------------------------------------------------------------- epilogues


def _row_blocks(n: int, v: int):
    rows = max(1, min(EPILOGUE_BLOCK_BYTES // (4 * max(v, 1)), -(-n // EPILOGUE_BLOCK_FRACTION)))
    return ((r0, min(r0 + rows, n)) for r0 in range(0, n, rows))


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
        """In place: ``z ← g·(onehot − exp(zc − lse))·(1 − (zc/c)²)``, ``zc`` the soft-capped logits. Temporaries
        are row blocks of at most EPILOGUE_BLOCK_BYTES."""
        n, v = z.shape
        for r0, r1 in _row_blocks(n, v):
            zb, tb, gb, lb = z[r0:r1], t[r0:r1], g[r0:r1], lse[r0:r1]
            inside = (tb >= vs) & (tb < vs + v)
            col = (tb - vs).clamp(0, v - 1)[:, None]
            if softcap is None:
                zb.sub_(lb[:, None]).exp_().mul_(-gb[:, None])
                hit = gb
            else:
                th = torch.tanh(zb / softcap)
                deriv = 1.0 - th * th
                zb.copy_(torch.exp(th * softcap - lb[:, None]).mul_(deriv).mul_(-gb[:, None]))
                hit = gb * deriv.gather(1, col).squeeze(1)
            zb.scatter_add_(1, col, torch.where(inside, hit, torch.zeros_like(hit))[:, None])
        return z


class ExtensionEpilogue:
    lse_update = staticmethod(_extension.lse_update)
    grad_logits = staticmethod(_extension.grad_logits)


def pick_epilogue(device: torch.device, opts: LogpsOptions):
    """The compiled CPU epilogue when it is built (and not switched off), else plain torch."""
    if device.type == "cpu" and opts.use_extension and _extension.cpu_module() is not None:
        return ExtensionEpilogue
    return TorchEpilogue


# ----------------------------------------------------------------------------------------------- forward


def _logits_into(z, hc, wc, bc, scale: float = 1.0):
    """``z ← scale · (hc·wcᵀ + bc)`` in float32 (``z`` float32 ``[rows, cols]``)."""
    mm_into(z, hc, wc.T)
    if bc is not None:
        z += bc.float()
    if scale != 1.0:
        z *= scale
    return z


def _logit_block(hc, wc, bc, scale: float = 1.0):
    return _logits_into(torch.empty(hc.shape[0], wc.shape[0], dtype=torch.float32, device=hc.device),
                        hc, wc, bc, scale)


def forward(hidden2d, weight, bias, targets, opts: LogpsOptions, *, epilogue=None):
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
    # The live rows, gathered once (a view when every token is live): gathering per (vocabulary chunk, token
    # chunk) would copy them again for every vocabulary chunk, about 27 GB at N = 64k on a Llama-3 head.
    hidden_live = hidden2d if n_live == n_tok else hidden2d.index_select(0, live_idx)
    w_buf = cast_buffer(weight, hidden2d, vc)  # float32 master weights: rounded chunk by chunk into it
    with exact_matmul(hidden2d.device):
        for vs in range(0, vocab, vc):
            ve = min(vs + vc, vocab)
            wc = operand_chunk(weight, vs, ve, hidden2d.dtype, w_buf)
            bc = bias[vs:ve] if bias is not None else None
            for ts in range(0, n_live, tc):
                te = min(ts + tc, n_live)
                hc = hidden_live[ts:te]
                z = _logit_block(hc, wc, bc, opts.logit_scale)
                epilogue.lse_update(z, tgt[ts:te], vs, opts.softcap, m[ts:te], s[ts:te], tz[ts:te])
    lse_live = m + torch.log(s)
    lse = torch.zeros(n_tok, device=hidden2d.device)
    token_logps = torch.zeros(n_tok, device=hidden2d.device)
    lse.index_copy_(0, live_idx, lse_live)
    token_logps.index_copy_(0, live_idx, tz - lse_live)
    return token_logps, lse


# ----------------------------------------------------------------------------------------------- backward


class EpilogueGradLogits:
    """``dz`` producer: float32 logits of the chunk by GEMM, then ``epilogue.grad_logits`` in place.

    With ``dz_dtype`` float32 the logits are computed straight into ``dz``; otherwise (cublas, half inputs) into
    a float32 scratch chunk, and the CUDA epilogue writes ``dz`` from it once in ``dz_dtype``.
    """

    def __init__(self, weight, bias, opts: LogpsOptions, epilogue, dz_dtype: torch.dtype):
        self.weight, self.bias, self.opts, self.epilogue = weight, bias, opts, epilogue
        self.dz_dtype = dz_dtype
        self.scratch_dtype = None if dz_dtype == torch.float32 else torch.float32
        self.bytes_per_element = 4 + (dz_dtype.itemsize if self.scratch_dtype is not None else 0)
        if epilogue is TorchEpilogue:  # its row-block temporaries: at most half the chunk in float32
            self.bytes_per_element += 2

    def __call__(self, hc, tgt, lse, g, vs, ve, dz, db, scratch, w_c=None):
        z = dz if scratch is None else scratch.view(dz.shape)
        w_c = operand_chunk(self.weight, vs, ve, hc.dtype) if w_c is None else w_c
        # (the logit scale's dz factor comes in through g, see _SequenceLogps._backward)
        _logits_into(z, hc, w_c, self.bias[vs:ve] if self.bias is not None else None, self.opts.logit_scale)
        if scratch is None:
            self.epilogue.grad_logits(z, tgt, vs, self.opts.softcap, lse, g)
        else:
            _extension.grad_logits_to(z, tgt, vs, self.opts.softcap, lse, g, dz, keep=db is not None)
        if db is not None:
            db += z.sum(0)


def backward(hidden2d, weight, bias, targets, lse, g, opts: LogpsOptions, need_dh, need_dw, need_db, *,
             epilogue=None, dz_dtype: torch.dtype = torch.float32):
    producer = EpilogueGradLogits(weight, bias, opts, epilogue or pick_epilogue(hidden2d.device, opts), dz_dtype)
    return chunked_backward(hidden2d, weight, bias, targets, lse, g, opts, need_dh, need_dw, need_db, producer)
