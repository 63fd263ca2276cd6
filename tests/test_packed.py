"""Padding-free (packed) pairs: the op, the loss, a real decoder and the trainer give what the padded layout gives.

Packed sequences are the padded rows with their trailing padding removed, concatenated in row order (the P chosen,
then the P rejected), with ``cu_seqlens`` their boundaries.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from alphadpo_kernels import FusedAlphaDPOLoss, fused_alpha_dpo_loss, fused_sequence_logps
from conftest import rel_err
from helpers import SMALL_BLOCKS, cublas_on_cpu, make_inputs


@pytest.fixture(params=["torch", "triton", "cublas"])
def backend(request, monkeypatch):
    if request.param == "cublas":
        cublas_on_cpu(monkeypatch)
    return request.param


def pack(hidden, labels, extra=()):
    """Drop each row's trailing padding (after its last live label) and concatenate the rows."""
    lengths = [int((labels[r] != -100).nonzero().max()) + 1 for r in range(labels.shape[0])]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cat = [torch.cat([t[r, :n] for r, n in enumerate(lengths)]) for t in (hidden, labels, *extra)]
    return (*cat, cu, lengths)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, (1e-5, 1e-5)), (torch.bfloat16, (1e-4, 1e-2))],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", [dict(), dict(shift=True), dict(shift=True, bias=True, softcap=3.0)],
                         ids=["plain", "shift", "all"])
def test_packed_equals_padded(backend, dtype, tol, variant):
    """Log-probs, loss, metrics and the gradients of hidden and weight (and bias) match the padded call."""
    variant = dict(variant)
    use_bias = variant.pop("bias", False)
    hidden, weight, labels, bias = make_inputs(rows=4, bias=use_bias, dtype=dtype, seed=81)
    ref_c, ref_r = torch.tensor([-2.0, -2.4]), torch.tensor([-2.2, -2.1])
    kw = dict(backend=backend, options=SMALL_BLOCKS, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
              margin_mean=0.05, margin_std=0.3, **variant)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()] + (
        [bias.clone().requires_grad_()] if use_bias else [])
    padded = fused_alpha_dpo_loss(leaves[0], leaves[1], labels, bias=leaves[2] if use_bias else None, **kw)
    pg = torch.autograd.grad(padded.loss, leaves)

    ph, pl, cu, lengths = pack(hidden, labels)
    pleaves = [ph.clone().requires_grad_(), weight.clone().requires_grad_()] + (
        [bias.clone().requires_grad_()] if use_bias else [])
    packed = fused_alpha_dpo_loss(pleaves[0], pleaves[1], pl, bias=pleaves[2] if use_bias else None,
                                  cu_seqlens=cu, **kw)
    kg = torch.autograd.grad(packed.loss, pleaves)

    logp_tol, grad_tol = tol
    assert rel_err(packed.chosen_logps, padded.chosen_logps) < logp_tol
    assert rel_err(packed.rejected_logps, padded.rejected_logps) < logp_tol
    assert rel_err(packed.loss, padded.loss) < max(logp_tol, 1e-5) * 10
    for k in padded.metrics:
        assert rel_err(packed.metrics[k], padded.metrics[k]) < max(logp_tol, 1e-5) * 10, k
    dh_padded = torch.cat([pg[0][r, :n] for r, n in enumerate(lengths)])
    assert rel_err(kg[0], dh_padded) < grad_tol
    assert all(bool((pg[0][r, n:] == 0).all()) for r, n in enumerate(lengths))  # the dropped positions
    for a, b in zip(kg[1:], pg[1:]):
        assert rel_err(a, b) < grad_tol


def test_shift_never_crosses_a_sequence_boundary():
    """A sequence's last position scores nothing, not the next sequence's first token."""
    hidden, weight, labels, _ = make_inputs(rows=2, seq=9, seed=83)
    labels = torch.randint(0, weight.shape[0], labels.shape, generator=torch.Generator().manual_seed(1))
    ph, pl, cu, lengths = pack(hidden, labels)
    assert lengths == [9, 9]
    packed = fused_sequence_logps(ph, weight, pl, cu_seqlens=cu, shift=True, backend="torch")
    separate = torch.cat([fused_sequence_logps(hidden[r:r + 1], weight, labels[r:r + 1], shift=True,
                                               backend="torch") for r in range(2)])
    assert rel_err(packed, separate) < 1e-6
    accepts_batched = fused_sequence_logps(ph[None], weight, pl[None], cu_seqlens=cu.long(), shift=True, backend="torch")
    assert torch.equal(accepts_batched, packed)


def test_module_and_reference_hidden_packed():
    hidden, weight, labels, _ = make_inputs(rows=4, seed=85)
    ref_hidden = hidden + 0.05 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))
    module_padded, module_packed = FusedAlphaDPOLoss(shift=True), FusedAlphaDPOLoss(shift=True)
    ph, pl, rh, cu, _ = pack(hidden, labels, extra=(ref_hidden,))
    for _ in range(3):
        a = module_padded(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight, backend="torch")
        b = module_packed(ph, weight, pl, ref_hidden=rh, ref_weight=weight, cu_seqlens=cu, backend="torch")
        # α-DPO normalises margins by their spread: last-bit differences in the log-probs show up amplified
        assert rel_err(b.loss, a.loss) < 1e-3 and rel_err(b.ref_chosen_logps, a.ref_chosen_logps) < 1e-5
        assert rel_err(b.chosen_logps, a.chosen_logps) < 1e-5
    assert rel_err(module_packed.margin_std, module_padded.margin_std) < 1e-3  # a spread of differences


@pytest.mark.parametrize("case,error,match", [
    ("float", TypeError, "cu_seqlens must be a 1-D int32 / int64 tensor"),
    ("2d", TypeError, "cu_seqlens must be a 1-D int32 / int64 tensor"),
    ("start", ValueError, "cu_seqlens must start at 0 and end at N"),
    ("end", ValueError, "cu_seqlens must start at 0 and end at N"),
    ("decreasing", ValueError, "cu_seqlens must not decrease"),
    ("empty", ValueError, r"cu_seqlens holds empty sequences \[1\]"),
    ("no_live", ValueError, r"cu_seqlens sequences \[0\] have no live label"),
    ("odd", ValueError, "cu_seqlens must hold 2·P sequences"),
    ("hidden_3d", ValueError, "with cu_seqlens, hidden must be packed as"),
    ("labels_len", ValueError, "with cu_seqlens, labels must be packed as"),
    ("ref_hidden_3d", ValueError, "with cu_seqlens, ref_hidden must be packed as"),
])
def test_bad_cu_seqlens_are_named(case, error, match):
    hidden, weight, labels, _ = make_inputs(rows=4, seed=87)
    ph, pl, cu, _ = pack(hidden, labels)
    kw = dict(ref_chosen_logps=torch.full((2,), -2.0), ref_rejected_logps=torch.full((2,), -2.0), backend="torch")
    cu = cu.clone()
    if case == "float":
        cu = cu.float()
    elif case == "2d":
        cu = cu[None]
    elif case == "start":
        cu[0] = 1
    elif case == "end":
        cu[-1] -= 1
    elif case == "decreasing":
        cu[2] = cu[1] - 1
    elif case == "empty":
        cu[2] = cu[1]
    elif case == "no_live":
        pl = pl.clone()
        pl[: int(cu[1])] = -100
    elif case == "odd":
        cu = cu[:-1].clone()
        cu[-1] = ph.shape[0]
    elif case == "hidden_3d":
        ph = ph.view(2, -1, ph.shape[-1])
    elif case == "labels_len":
        pl = pl[:-1]
    if case == "ref_hidden_3d":
        kw = dict(ref_hidden=ph.view(2, -1, ph.shape[-1]), ref_weight=weight, backend="torch")
    with pytest.raises(error, match=match):
        fused_alpha_dpo_loss(ph, weight, pl, cu_seqlens=cu, **kw)


# --------------------------------------------------------------------------------------- a real decoder


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_llama_packed_equals_padded(attn):
    """A decoder run on packed sequences (position_ids restarting, no mask) gives the padded run's per-sequence
    log-probs and loss."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alphadpo_kernels.train.data import PreferenceCollator
    from alphadpo_kernels.train.modeling import PreferenceModel

    config = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    g = torch.Generator().manual_seed(3)
    items = []
    for i in range(3):
        prompt = torch.randint(1, 60, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        seqs = {}
        for key in ("chosen", "rejected"):
            ans = torch.randint(1, 60, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            seqs[f"{key}_input_ids"] = prompt + ans
            seqs[f"{key}_labels"] = [-100] * len(prompt) + ans
        items.append(dict(seqs, index=i))
    ref = dict(ref_chosen_logps=torch.tensor([-4.0, -4.1, -4.2]), ref_rejected_logps=torch.tensor([-4.3, -4.0, -4.4]))
    outs = []
    for padding_free in (False, True):
        batch = dict(PreferenceCollator(0, padding_free=padding_free)(items), **ref)
        pm = PreferenceModel(model, FusedAlphaDPOLoss(shift=True))
        out = pm(batch)
        outs.append((out, torch.autograd.grad(out.loss, [model.model.embed_tokens.weight])[0]))
    (a, ga), (b, gb) = outs
    assert rel_err(b.chosen_logps, a.chosen_logps) < 1e-5 and rel_err(b.rejected_logps, a.rejected_logps) < 1e-5
    assert rel_err(b.loss, a.loss) < 1e-5 and rel_err(gb, ga) < 1e-4


# --------------------------------------------------------------------------------------- the trainer


def test_trainer_padding_free_trains_the_same_model(tmp_path):
    pytest.importorskip("transformers")
    from alphadpo_kernels.train.trainer import main

    steps = ["--demo", "--max-steps", "40", "--eval-steps", "1000", "--logging-steps", "10", "--save-steps", "1000"]
    padded = main(steps + ["--output-dir", str(tmp_path / "padded")])
    packed = main(steps + ["--padding-free", "true", "--output-dir", str(tmp_path / "packed")])
    assert packed["eval/rewards/accuracies"] == padded["eval/rewards/accuracies"] >= 0.9
    a = [json.loads(x) for x in open(tmp_path / "padded" / "metrics.jsonl") if "train/loss" in x]
    b = [json.loads(x) for x in open(tmp_path / "packed" / "metrics.jsonl") if "train/loss" in x]
    assert b[0]["train/loss"] == pytest.approx(a[0]["train/loss"], rel=1e-4)  # the first window, before drift
    assert os.path.exists(tmp_path / "packed" / "final" / "model.safetensors")


def test_padding_free_refuses_an_attention_that_cannot_see_packed_sequences():
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alphadpo_kernels.train.modeling import check_padding_free

    config = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    check_padding_free(model)
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="padding_free needs an attention implementation"):
        check_padding_free(model)
