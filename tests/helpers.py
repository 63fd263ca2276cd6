"""Input builders shared by the tests."""

from __future__ import annotations

import math

import torch

from alphadpo_kernels import LogpsOptions

# Small tiles so that the odd test shapes exercise every tail: V = 123 is not a multiple of 32, H = 40 not of 16.
SMALL_BLOCKS = LogpsOptions(fwd_block_m=16, fwd_block_n=32, fwd_block_k=16,
                            bwd_block_m=16, bwd_block_n=32, bwd_block_k=16, bwd_group_m=2, fwd_group_m=2, fwd_splits=2,
                            chunk_tokens=7, chunk_vocab=50)


def make_inputs(rows=4, seq=23, hdim=40, vocab=123, dtype=torch.float32, *, bias=False, seed=0,
                device="cpu", logit_scale=2.0, ignore_index=-100):
    """Random hidden/head/labels with masked prompt prefixes of varying length and right padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq, hdim, generator=g)
    weight = torch.randn(vocab, hdim, generator=g) * (logit_scale / math.sqrt(hdim))
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    for r in range(rows):
        prompt = int(torch.randint(1, seq // 2, (1,), generator=g))
        labels[r, :prompt] = ignore_index
        if r % 2 == 1:  # right padding on every other row
            pad = int(torch.randint(1, seq // 4 + 1, (1,), generator=g))
            labels[r, seq - pad:] = ignore_index
    to = dict(device=device, dtype=dtype)
    return (hidden.to(**to), weight.to(**to), labels.to(device), b.to(**to) if b is not None else None)


def check_against_fp64(hidden, weight, labels, bias=None, *, logp_tol=1e-5, grad_tol=1e-4, **kwargs):
    """``fused_sequence_logps(..., **kwargs)`` and its gradients in hidden, weight (and bias) against the
    float64 full-logits reference on the same (rounded) inputs, within the given relative tolerances."""
    from alphadpo_kernels import fused_sequence_logps, reference_sequence_logps
    from conftest import rel_err

    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = fused_sequence_logps(hidden, weight, labels, bias=bias, **kwargs)
    grads = torch.autograd.grad(out.sum(), leaves)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref_kwargs = {k: kwargs[k] for k in ("softcap", "shift", "average", "ignore_index") if k in kwargs}
    ref = reference_sequence_logps(l64[0], l64[1], labels, bias=l64[2] if bias is not None else None, **ref_kwargs)
    ref_grads = torch.autograd.grad(ref.sum(), l64)
    assert rel_err(out, ref) < logp_tol, ("logps", rel_err(out, ref))
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert rel_err(g, r) < grad_tol, (name, rel_err(g, r))
    return out, grads


def cublas_on_cpu(monkeypatch):
    """Run ``backend="cublas"`` on CPU tensors: its driver, GEMM helpers and chunking as on a GPU, with the one
    CUDA-only piece, the epilogue that writes dz in the input dtype, replaced by its torch twin."""
    from alphadpo_kernels import _extension
    from alphadpo_kernels.ops.sequence_logps import cublas_chunked, torch_chunked

    monkeypatch.setattr(cublas_chunked, "check_available", lambda hidden2d: None)

    def grad_logits_to(z, t, vs, softcap, lse, g, out, *, keep):
        torch_chunked.TorchEpilogue.grad_logits(z, t, vs, softcap, lse, g)
        out.copy_(z)

    monkeypatch.setattr(_extension, "grad_logits_to", grad_logits_to)
    if _extension.cpu_module() is None:
        monkeypatch.setattr(torch_chunked.ExtensionEpilogue, "lse_update", torch_chunked.TorchEpilogue.lse_update)
        monkeypatch.setattr(torch_chunked.ExtensionEpilogue, "grad_logits", torch_chunked.TorchEpilogue.grad_logits)


def free_port() -> int:
    """A free TCP port on this machine, for a multi-process run's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_llama(path) -> str:
    """A tiny float32 Llama (hidden 32, 2 layers, GQA) over the demo's tokenizer, saved to ``path``: what the
    multi-process trainer tests load (partitioned by ZeRO-3, sharded by a tp_plan)."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from alphadpo_kernels.train.demo import ASSETS

    vocab = len(AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer")))
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)
