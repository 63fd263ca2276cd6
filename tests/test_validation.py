"""Every bad input fails before any kernel runs, with an error that names the argument."""

from __future__ import annotations

import pytest
import torch

from alphadpo_kernels import FusedAlphaDPOLoss, LogpsOptions, fused_alpha_dpo_loss, fused_sequence_logps
from helpers import make_inputs


@pytest.fixture
def inputs():
    return make_inputs(rows=4, seq=9, hdim=8, vocab=20, seed=1)


def _refs():
    return dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,exc,match", [
    ("hidden_2d", ValueError, r"hidden must have shape \[rows, T, H\]"),
    ("hidden_int", TypeError, "hidden must be a floating tensor"),
    ("hidden_list", TypeError, "hidden must be a torch.Tensor"),
    ("weight_h", ValueError, r"weight must have shape \[V, H\] with H = 8"),
    ("weight_dtype", TypeError, "weight must be a floating tensor"),
    ("labels_shape", ValueError, r"labels must have shape \[rows, T\]"),
    ("labels_float", TypeError, "labels must be an integer tensor"),
    ("label_too_big", ValueError, r"labels must be in \[0, 20\) \(the vocabulary of weight\) or ignore_index=-100; labels\[1, 5\] = 20"),
    ("label_negative", ValueError, r"labels\[0, 8\] = -7"),
    ("empty_row", ValueError, r"rows with no live label .*rows \[2\]"),
    ("empty_after_shift", ValueError, "after the next-token shift"),
    ("bias_shape", ValueError, r"bias must have shape \[V\]"),
    ("softcap", ValueError, "softcap must be a positive finite number"),
    ("shift_short", ValueError, "shift=True needs T >= 2"),
    ("backend", ValueError, "backend must be one of"),
    ("float64", TypeError, "float64 is for reference_sequence_logps"),
])
def test_sequence_logps_bad_input(inputs, case, exc, match, backend):
    hidden, weight, labels, _ = inputs
    kw: dict = dict(backend=backend)
    if case == "hidden_2d":
        hidden = hidden[0]
    elif case == "hidden_int":
        hidden = hidden.long()
    elif case == "hidden_list":
        hidden = hidden.tolist()
    elif case == "weight_h":
        weight = weight[:, :5]
    elif case == "weight_dtype":
        weight = weight.long()
    elif case == "labels_shape":
        labels = labels[:, :4]
    elif case == "labels_float":
        labels = labels.float()
    elif case == "label_too_big":
        labels[1, 5] = 20
    elif case == "label_negative":
        labels[0, 8] = -7
    elif case == "empty_row":
        labels[2] = -100
    elif case == "empty_after_shift":
        labels[3, 1:] = -100
        labels[3, 0] = 4
        kw["shift"] = True
    elif case == "bias_shape":
        kw["bias"] = torch.zeros(19)
    elif case == "softcap":
        kw["softcap"] = -1.0
    elif case == "shift_short":
        hidden, labels = hidden[:, :1], labels[:, :1].clamp(min=0)
        kw["shift"] = True
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "float64":
        hidden, weight = hidden.double(), weight.double()
    with pytest.raises(exc, match=match):
        fused_sequence_logps(hidden, weight, labels, **kw)


def test_value_checks_can_be_switched_off(inputs):
    hidden, weight, labels, _ = inputs
    labels[2] = -100  # an empty row: only the value check would see it
    with pytest.raises(ValueError):
        fused_sequence_logps(hidden, weight, labels, backend="torch")
    out = fused_sequence_logps(hidden, weight, labels, backend="torch", check_values=False)
    assert out.shape == (4,)


@pytest.mark.parametrize("case,exc,match", [
    ("odd_rows", ValueError, "odd number: 3"),
    ("no_reference", ValueError, "needs reference log-probs"),
    ("half_reference", ValueError, "ref_rejected_logps is missing"),
    ("both_references", ValueError, "not both"),
    ("ref_shape", ValueError, r"ref_chosen_logps must have shape \[P\] = \(2,\)"),
    ("ref_int", TypeError, "ref_chosen_logps must be a floating tensor"),
    ("ref_hidden_no_weight", ValueError, "ref_hidden given without ref_weight"),
    ("ref_hidden_shape", ValueError, r"ref_hidden must have shape \[rows, T, H\]"),
    ("ref_weight_shape", ValueError, r"ref_weight must have shape \[V, H\]"),
    ("loss_type", ValueError, "loss_type must be one of"),
])
def test_loss_bad_input(inputs, case, exc, match):
    hidden, weight, labels, _ = inputs
    kw: dict = _refs()
    if case == "odd_rows":
        hidden, labels = hidden[:3], labels[:3]
    elif case == "no_reference":
        kw = {}
    elif case == "half_reference":
        kw.pop("ref_rejected_logps")
    elif case == "both_references":
        kw.update(ref_hidden=hidden, ref_weight=weight)
    elif case == "ref_shape":
        kw["ref_chosen_logps"] = torch.zeros(4)
    elif case == "ref_int":
        kw["ref_chosen_logps"] = torch.zeros(2, dtype=torch.long)
    elif case == "ref_hidden_no_weight":
        kw = dict(ref_hidden=hidden)
    elif case == "ref_hidden_shape":
        kw = dict(ref_hidden=hidden[0], ref_weight=weight)
    elif case == "ref_weight_shape":
        kw = dict(ref_hidden=hidden, ref_weight=weight[:, :3])
    elif case == "loss_type":
        kw["loss_type"] = "kto"
    with pytest.raises(exc, match=match):
        fused_alpha_dpo_loss(hidden, weight, labels, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(beta=0.0), "beta must be positive"),
    (dict(ema_momentum=1.0), r"ema_momentum must be in \[0, 1\)"),
    (dict(loss_type="orpo"), "loss_type must be one of"),
])
def test_module_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        FusedAlphaDPOLoss(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(fwd_block_n=24), "fwd_block_n must be a power of two >= 16"),
    (dict(bwd_block_k=8), "bwd_block_k must be a power of two >= 16"),
    (dict(chunk_tokens=0), "chunk_tokens must be a positive integer"),
    (dict(memory_budget_mb=0), "memory_budget_mb must be positive"),
])
def test_options_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LogpsOptions(**kw)
