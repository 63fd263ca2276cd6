"""Tests written against hand-made bugs that survived the rest of the suite (mutation testing):

* label smoothing's sign flipped: the smoothed −log σ losses against a plain transcription of the conservative-DPO
  formula ``−(1−ε)·log σ(βz) − ε·log σ(−βz)`` (the released α-DPO trainer's and TRL's);
* gradient clipping turned off (``alphadpo-train`` and ``AlphaDPOTrainer``): the logged norm is taken before
  clipping, so only the update shows it. With AdamW the first update is ``lr·g/(|g| + eps)``: clipped to a total
  norm of 1e-10 every ``|g|`` is far below ``eps = 1e-8`` and no weight moves by more than ``lr/100``, where the
  unclipped step moves most weights by about ``lr``;
* dropout on in the policy or in the reference pass: with a checkpoint whose ``attention_dropout`` is 0.3 (the demo
  Llama's is 0), a learning-rate-0 run must log margins of exactly 0 and equal policy / reference log-probs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from alphadpo_kernels import FusedAlphaDPOLoss, fused_alpha_dpo_loss, reference_sequence_logps

LR = 1e-3


def _conservative(z, beta, eps):
    """The released trainer's / TRL's label-smoothed sigmoid loss, transcribed."""
    return -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)


# -- label smoothing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("loss_type", ["alpha_dpo", "simpo", "sigmoid"])
def test_label_smoothing_is_the_conservative_dpo_loss(loss_type, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-1.0 - torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    beta, ratio, alpha, c1, c2 = 2.0, 0.4, 0.3, 0.05, 0.2
    module = FusedAlphaDPOLoss(beta=beta, gamma_beta_ratio=ratio, alpha=alpha, loss_type=loss_type,
                               label_smoothing=eps).eval()  # eval: the α-DPO statistics are used as they are
    module.margin_mean.fill_(c1)
    module.margin_std.fill_(c2)
    pc_leaf = pc.clone().requires_grad_()
    out = module.loss_from_logps(pc_leaf, pr, rc, rr)
    if loss_type == "alpha_dpo":
        margins = (pc - pr) - (rc - rr)
        z = pc - pr - (alpha * (margins - c1) / c2 + ratio)
    elif loss_type == "simpo":
        z = pc - pr - ratio
    else:
        z = pc - pr - rc + rr
    pc_ref = pc.clone().requires_grad_()
    zz = z + (pc_ref - pc)  # the same z, differentiable in pc (α-DPO's shift is a stop-gradient)
    expect = _conservative(zz, beta, eps).mean()
    assert float(out.loss) == pytest.approx(float(expect), rel=1e-6)
    (grad,) = torch.autograd.grad(out.loss, pc_leaf)
    (grad_ref,) = torch.autograd.grad(expect, pc_ref)
    assert torch.allclose(grad, grad_ref, rtol=1e-6, atol=1e-9)
    # the smoothing changes the loss (it is not silently ignored)
    plain = FusedAlphaDPOLoss(beta=beta, gamma_beta_ratio=ratio, alpha=alpha, loss_type=loss_type).eval()
    plain.load_state_dict(module.state_dict())
    assert abs(float(plain.loss_from_logps(pc, pr, rc, rr).loss) - float(out.loss)) > 1e-3


def test_label_smoothing_through_the_fused_op():
    """The same formula on the fused path (hidden states + head), against float64 full-logits log-probs."""
    from helpers import make_inputs

    hidden, weight, labels, _ = make_inputs(rows=4, seq=13, hdim=16, vocab=37)
    rc, rr = torch.tensor([-3.0, -3.2]), torch.tensor([-3.4, -2.9])
    out = fused_alpha_dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, loss_type="sigmoid",
                               beta=0.5, label_smoothing=0.2, shift=True, backend="torch")
    logps = reference_sequence_logps(hidden, weight, labels, shift=True)
    z = logps[:2] - logps[2:] - rc.double() + rr.double()
    assert float(out.loss) == pytest.approx(float(_conservative(z, 0.5, 0.2).mean()), rel=1e-5)


# -- tiny checkpoints --------------------------------------------------------------------------------------------------

def _tiny_llama(folder, **extra) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from alphadpo_kernels.train.demo import ASSETS

    tok = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, attn_implementation="eager", **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def _max_update(before: dict, after: dict) -> float:
    assert before.keys() == after.keys()
    return max(float((after[k].float() - before[k].float()).abs().max()) for k in before)


def _train_log(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "train/loss" in line]


# one optimizer step of the demo task on the tiny checkpoint, float32, no warm-up, no weight decay
CLI = ["--demo", "--logging-steps", "1", "--eval-steps", "1000", "--save-steps", "1000", "--mixed-precision", "no",
       "--per-device-train-batch-size", "4", "--per-device-eval-batch-size", "64", "--gradient-accumulation-steps", "1",
       "--warmup-ratio", "0", "--weight-decay", "0"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The demo's task, 16 training and 8 evaluation pairs (the reference pass and evaluation stay short)."""
    from alphadpo_kernels.train.demo import ASSETS

    folder = tmp_path_factory.mktemp("data")
    for name, n in (("train", 16), ("eval", 8)):
        with open(os.path.join(ASSETS, f"sort_{name}.jsonl")) as f, open(folder / f"{name}.jsonl", "w") as out:
            out.writelines(line for _, line in zip(range(n), f))
    return ["--train-file", str(folder / "train.jsonl"), "--eval-file", str(folder / "eval.jsonl")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_dropout(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("tiny_dropout"), attention_dropout=0.3)


# -- gradient clipping -------------------------------------------------------------------------------------------------

def test_alphadpo_train_clips_the_gradient(tiny, small_data, tmp_path):
    from alphadpo_kernels.train.trainer import main

    runs = {}
    for norm in ("1e-10", "0"):
        out = tmp_path / f"clip{norm}"
        main(CLI + small_data + ["--model-name-or-path", tiny, "--max-steps", "1", "--learning-rate", str(LR),
                                 "--max-grad-norm", norm, "--output-dir", str(out)])
        runs[norm] = _max_update(_weights(tiny), _weights(out / "final"))
    assert _train_log(tmp_path / "clip1e-10")[0]["train/grad_norm"] > 1e-3  # logged before clipping
    assert runs["0"] > 0.5 * LR  # unclipped: Adam's first step moves weights by about lr
    assert runs["1e-10"] < 0.02 * LR, runs  # clipped to 1e-10: |g| << eps, no weight moves by more than lr/100


def _trl_args(tmp_path, name, **kw):
    from alphadpo_kernels.integrations.trl import AlphaDPOConfig

    base = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1, learning_rate=LR,
                logging_steps=1, report_to="none", save_strategy="no", seed=0, use_cpu=True, bf16=False,
                disable_tqdm=True, lr_scheduler_type="constant")
    return AlphaDPOConfig(**{**base, **kw})


def _trl_rows():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        xs = torch.randint(0, 10, (3 + i % 3,), generator=g).tolist()
        rows.append(dict(prompt="sort these : " + " ".join(map(str, xs)), chosen=" " + " ".join(map(str, sorted(xs))),
                         rejected=" " + " ".join(map(str, xs[::-1]))))
    return rows


def test_alphadpo_trainer_clips_the_gradient(tiny, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset

    from alphadpo_kernels.integrations.trl import AlphaDPOTrainer

    data = Dataset.from_list(_trl_rows())
    runs = {}
    for norm in (1e-10, 0.0):
        trainer = AlphaDPOTrainer(model=tiny, train_dataset=data,
                                  args=_trl_args(tmp_path, f"t{norm}", max_grad_norm=norm, loss_type="sigmoid"))
        before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        runs[norm] = _max_update(before, dict(trainer.model.state_dict()))
    assert runs[0.0] > 0.5 * LR
    assert runs[1e-10] < 0.02 * LR, runs


# -- dropout -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["precompute", "online"])
@pytest.mark.parametrize("reference", ["copy", "path"])
def test_learning_rate_zero_with_attention_dropout_logs_zero_margins(tiny_dropout, small_data, tmp_path, reference,
                                                                     mode):
    """A checkpoint with ``attention_dropout=0.3``: dropout must be off in the policy and in the reference pass (the
    reference as the policy's starting copy, or loaded from its own path; precomputed, or run at every step), so at
    learning rate 0 every margin is exactly 0 and the policy's log-probs equal the reference's, step after step."""
    from alphadpo_kernels.train.trainer import main

    ref = ["--ref-model-name-or-path", tiny_dropout] if reference == "path" else []
    ref += ["--reference-mode", mode]
    main(CLI + small_data + ["--model-name-or-path", tiny_dropout, *ref, "--max-steps", "3", "--learning-rate", "0",
                "--output-dir", str(tmp_path)])
    log = _train_log(tmp_path)
    assert len(log) == 3
    for r in log:
        assert r["train/margin_mean"] == 0.0 and r["train/margin_std"] == 0.0, r
        assert r["train/logps/chosen"] == r["train/logps/ref_chosen"], r
        assert r["train/logps/rejected"] == r["train/logps/ref_rejected"], r


def test_learning_rate_zero_with_attention_dropout_alphadpo_trainer(tiny_dropout, tmp_path):
    """The same through ``AlphaDPOTrainer``: TRL's ``disable_dropout`` resets ``nn.Dropout`` modules only, not Llama's
    ``attention_dropout`` rate, which the integration zeroes too."""
    pytest.importorskip("trl")
    from datasets import Dataset

    from alphadpo_kernels.integrations.trl import AlphaDPOTrainer

    trainer = AlphaDPOTrainer(model=tiny_dropout, train_dataset=Dataset.from_list(_trl_rows()),
                              args=_trl_args(tmp_path, "d", max_steps=2, learning_rate=0.0))
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert len(hist) == 2
    for h in hist:
        assert h["margin_mean"] == 0.0 and h["margin_std"] == 0.0, h
