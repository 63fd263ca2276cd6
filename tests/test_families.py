"""Every common model family: the trainer's glue gives the per-sequence log-probs of ``model(...).logits``.

Tiny configs, built from scratch (no downloads). Covered: Llama, Mistral, Qwen2 (tied embeddings), Gemma-2 (soft-cap,
tied embeddings), Gemma-3, Phi-3, and the families that scale their logits after the head: Cohere
(``logit_scale``), Granite (divides by ``logits_scaling``), HyperCLOVA X (multiplies by it). A head that does something else is refused by name.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from alphadpo_kernels import FusedAlphaDPOLoss  # noqa: E402
from alphadpo_kernels.train.data import PreferenceCollator  # noqa: E402
from alphadpo_kernels.train.modeling import (  # noqa: E402
    PreferenceModel,
    head_transform_of,
    reference_logps,
    verify_head,
)
from conftest import rel_err  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(final_logit_softcapping=3.0, head_dim=8, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=5.0)),
    "phi3": ("Phi3Config", {}),
    "cohere": ("CohereConfig", dict(logit_scale=0.25)),
    "granite": ("GraniteConfig", dict(logits_scaling=4.0)),
    "hyperclovax": ("HyperCLOVAXConfig", dict(logits_scaling=0.5)),  # multiplies where Granite divides
}


def _model(family):
    name, extra = FAMILIES[family]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    config = getattr(transformers, name)(**{**SMALL, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # logits of a trained model's spread, so that scale and soft-cap matter
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(2):
        prompt = torch.randint(1, 97, (4 + i,), generator=g).tolist()
        seqs = {}
        for key in ("chosen", "rejected"):
            ans = torch.randint(1, 97, (3 + 2 * i,), generator=g).tolist()
            seqs[f"{key}_input_ids"], seqs[f"{key}_labels"] = prompt + ans, [-100] * len(prompt) + ans
        items.append(dict(seqs, index=i))
    return PreferenceCollator(0)(items)


def _plain_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    live = labels != -100
    tok = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0]
    return (tok * live).sum(-1) / live.sum(-1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_glue_matches_the_models_own_logits(family):
    model, batch = _model(family), _batch()
    verify_head(model)
    scale, softcap = head_transform_of(model)
    assert (scale != 1.0) == (family in ("cohere", "granite", "hyperclovax"))
    assert (softcap is not None) == (family in ("gemma2", "gemma3"))
    plain = _plain_logps(model, batch)
    loss_fn = FusedAlphaDPOLoss(shift=True)
    ref = reference_logps(model, batch, loss_fn, backend="torch")
    assert rel_err(ref, plain) < 1e-5
    out = PreferenceModel(model, loss_fn, backend="torch")(dict(batch, ref_chosen_logps=plain[:2] - 0.1,
                                                                 ref_rejected_logps=plain[2:] - 0.1))
    assert rel_err(torch.cat([out.chosen_logps, out.rejected_logps]), plain) < 1e-5
    assert loss_fn.logit_scale == scale and loss_fn.softcap == softcap


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trl_forward_matches_the_models_own_logits(family):
    """The TRL integration's forward (``alphadpo_logps=...``) gives the same per-sequence log-probs."""
    pytest.importorskip("trl")
    from alphadpo_kernels.integrations.trl import LogpsRequest, add_alphadpo_head

    model, batch = _model(family), _batch()
    plain = _plain_logps(model, batch)
    add_alphadpo_head(model)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    alphadpo_logps=LogpsRequest(average=True, backend="torch"))
    assert rel_err(out.logps, plain) < 1e-5
    assert torch.equal(model(input_ids=batch["input_ids"]).logits, _model(family)(input_ids=batch["input_ids"]).logits)


def test_a_head_that_does_something_else_is_refused(monkeypatch):
    model = _model("llama")
    real = type(model).forward

    def doubled(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.logits = out.logits * 2.0  # a transformation no config attribute announces
        return out

    monkeypatch.setattr(type(model), "forward", doubled)
    with pytest.raises(ValueError, match="LlamaForCausalLM: its LM head's logits are not softcap"):
        verify_head(model)


def test_scale_and_softcap_compose_in_the_kernels():
    """z = softcap(scale · (h·Wᵀ + b)) with gradients, every backend, against the float64 reference."""
    from alphadpo_kernels import fused_sequence_logps, reference_sequence_logps
    from helpers import SMALL_BLOCKS, make_inputs

    hidden, weight, labels, bias = make_inputs(bias=True, seed=91)
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = fused_sequence_logps(*leaves[:2], labels, bias=leaves[2], logit_scale=0.3, softcap=2.0, shift=True,
                                   backend=backend, options=SMALL_BLOCKS)
        grads = torch.autograd.grad(out.sum(), leaves)
        l64 = [t.detach().double().requires_grad_() for t in leaves]
        ref = reference_sequence_logps(*l64[:2], labels, bias=l64[2], logit_scale=0.3, softcap=2.0, shift=True)
        assert rel_err(out, ref) < 1e-5
        for g, r in zip(grads, torch.autograd.grad(ref.sum(), l64)):
            assert rel_err(g, r) < 1e-4
    with pytest.raises(ValueError, match="logit_scale must be a positive finite number"):
        fused_sequence_logps(hidden, weight, labels, logit_scale=0.0)
