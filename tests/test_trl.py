"""The TRL integration against stock ``trl.DPOTrainer``, on a tiny Llama built from a config and saved to a temp
folder (no downloads): the same losses and metrics step by step for DPO with summed log-probs (and IPO with TRL's
length normalisation), α-DPO's statistics moving, saved and restored, reference caches that cannot collide.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MixtralConfig  # noqa: E402

from alphadpo_kernels import fused_sequence_logps  # noqa: E402
from alphadpo_kernels.integrations.trl import (  # noqa: E402
    STATE_NAME,
    AlphaDPOConfig,
    AlphaDPOTrainer,
    LogpsRequest,
)

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "alphadpo_kernels", "train", "demo_assets", "tokenizer")
COMPARED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "num_tokens")


def _save_model(folder, config_cls=LlamaConfig, vocab_size=None, **extra):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    config = config_cls(vocab_size=vocab_size or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("tiny_llama"))


def _rows():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):  # prompts and completions of several lengths; rejected completions shorter or longer
        n = 3 + i % 4
        xs = torch.randint(0, 10, (n,), generator=g).tolist()
        rows.append(dict(prompt="sort these : " + " ".join(map(str, xs)),
                         chosen=" " + " ".join(map(str, sorted(xs))),
                         rejected=" " + " ".join(map(str, xs[::-1][: n - i % 2]))))
    return rows


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(_rows())


def _common(tmp_path, name, **kw):
    return {**dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                   logging_steps=1, report_to="none", save_strategy="no", seed=0, use_cpu=True, bf16=False,
                   disable_tqdm=True), **kw}


def _history(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def _assert_same_history(stock, ours, rtol, atol, keys=COMPARED):
    assert len(stock) == len(ours) > 0
    for step, (a, b) in enumerate(zip(stock, ours)):
        for key in keys:
            assert math.isclose(a[key], b[key], rel_tol=rtol, abs_tol=atol), (step, key, a[key], b[key])


@pytest.mark.parametrize("trl_loss, ours_loss, extra", [
    ("sigmoid", "sigmoid", dict(average_log_prob=False)),
    # TRL normalises IPO's loss by completion length (its logged logps and rewards stay summed): ours with
    # length-normalised log-probs gives the same loss and gradients
    ("ipo", "ipo", {}),
])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_reproduces_stock_dpo_trainer_step_by_step(model_dir, dataset, tmp_path, trl_loss, ours_loss, extra,
                                                   accumulation):
    kw = dict(gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation)
    stock = trl.DPOTrainer(model=model_dir, train_dataset=dataset,
                           args=trl.DPOConfig(**_common(tmp_path, "stock", loss_type=trl_loss, beta=0.5, **kw)))
    stock.train()
    ours = AlphaDPOTrainer(model=model_dir, train_dataset=dataset,
                           args=AlphaDPOConfig(**_common(tmp_path, "ours", loss_type=ours_loss, beta=0.5, **kw,
                                                         **extra)))
    ours.train()
    keys = COMPARED if trl_loss == "sigmoid" else ("loss", "grad_norm", "num_tokens")
    _assert_same_history(_history(stock), _history(ours), rtol=2e-5, atol=1e-6, keys=keys)
    for (name, p), q in zip(stock.model.named_parameters(), ours.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-5), name


def test_bf16_autocast_close_to_stock(model_dir, dataset, tmp_path):
    """Under CPU bf16 autocast both trainers run the backbone in bf16; TRL also projects the head in bf16 where the
    fused op accumulates in float32, so they agree to bf16 accuracy, not bit for bit."""
    stock = trl.DPOTrainer(model=model_dir, train_dataset=dataset,
                           args=trl.DPOConfig(**{**_common(tmp_path, "stock", loss_type="sigmoid"), "bf16": True}))
    stock.train()
    ours = AlphaDPOTrainer(model=model_dir, train_dataset=dataset, args=AlphaDPOConfig(
        **{**_common(tmp_path, "ours", loss_type="sigmoid"), "bf16": True}))
    ours.train()
    a, b = _history(stock), _history(ours)
    assert b[0]["loss"] == a[0]["loss"] == pytest.approx(math.log(2))  # policy = reference at step 1: same autocast
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3)
        assert y["logps/chosen"] == pytest.approx(x["logps/chosen"], rel=1e-3)


def test_alpha_dpo_trains_and_its_statistics_move(model_dir, dataset, tmp_path):
    trainer = AlphaDPOTrainer(model=model_dir, train_dataset=dataset,
                              args=AlphaDPOConfig(**_common(tmp_path, "a", max_steps=4)))
    assert trainer.args.beta == 2.5 and trainer.args.average_log_prob and trainer.args.loss_type == ["alpha_dpo"]
    trainer.train()
    hist = _history(trainer)
    assert all(math.isfinite(h["loss"]) for h in hist)
    means = [h["margin_mean"] for h in hist]
    assert means[0] == 0.0  # step 1: policy = reference, every margin is 0
    assert len(set(means[1:])) == len(means) - 1 and all(m != 0 for m in means[1:])
    assert all(h["margin_std"] >= 0 for h in hist) and hist[-1]["margin_std"] > 0
    assert float(trainer.alphadpo_loss.margin_mean) == pytest.approx(means[-1])
    # evaluation logs the loss and leaves the statistics alone
    before = trainer.alphadpo_loss.margin_mean.clone(), trainer.alphadpo_loss.margin_std.clone()
    metrics = trainer.evaluate(dataset.select(range(8)))
    assert math.isfinite(metrics["eval_loss"]) and "eval_rewards/margins" in metrics
    assert torch.equal(before[0], trainer.alphadpo_loss.margin_mean)
    assert torch.equal(before[1], trainer.alphadpo_loss.margin_std)
    # the model's own forward is untouched: logits and TRL's fused head still work
    ids = torch.tensor([[1, 2, 3, 4]])
    assert trainer.model(input_ids=ids).logits.shape == (1, 4, trainer.model.config.vocab_size)
    assert trainer.model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.shape == (1, 3)


def test_resume_restores_the_margin_statistics(model_dir, dataset, tmp_path):
    args = dict(_common(tmp_path, "r", max_steps=4), save_strategy="steps", save_steps=2)
    full = AlphaDPOTrainer(model=model_dir, train_dataset=dataset, args=AlphaDPOConfig(**args))
    full.train()
    checkpoint = tmp_path / "r" / "checkpoint-2"
    saved = torch.load(checkpoint / STATE_NAME, weights_only=True)
    assert saved["loss_type"] == "alpha_dpo" and float(saved["margin_std"]) > 0

    resumed = AlphaDPOTrainer(model=model_dir, train_dataset=dataset,
                              args=AlphaDPOConfig(**{**args, "output_dir": str(tmp_path / "r2")}))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name in ("margin_mean", "margin_std"):
        assert torch.allclose(getattr(resumed.alphadpo_loss, name), getattr(full.alphadpo_loss, name),
                              rtol=1e-5, atol=1e-7), name
    last = _history(resumed)[-1]
    assert last["step"] == 4 and last["loss"] == pytest.approx(_history(full)[-1]["loss"], rel=1e-5)

    os.remove(checkpoint / STATE_NAME)  # a checkpoint without the statistics is refused for α-DPO, not zeroed
    again = AlphaDPOTrainer(model=model_dir, train_dataset=dataset,
                            args=AlphaDPOConfig(**{**args, "output_dir": str(tmp_path / "r3")}))
    with pytest.raises(ValueError, match="margin statistics cannot be restored"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_precomputed_reference_never_collides_with_trl(model_dir, dataset, tmp_path):
    common = _common(tmp_path, "p", precompute_ref_log_probs=True, max_steps=2)
    stock = trl.DPOTrainer(model=model_dir, train_dataset=dataset, args=trl.DPOConfig(**common))
    averaged = AlphaDPOTrainer(model=model_dir, train_dataset=dataset, args=AlphaDPOConfig(**common))
    summed = AlphaDPOTrainer(model=model_dir, train_dataset=dataset,
                             args=AlphaDPOConfig(**common, loss_type="sigmoid"))
    files = [t.train_dataset.cache_files[-1]["filename"] for t in (stock, averaged, summed)]
    assert len(set(files)) == 3
    trl_sum = torch.tensor(stock.train_dataset["ref_chosen_logps"])
    assert torch.allclose(torch.tensor(summed.train_dataset["ref_chosen_logps"]), trl_sum, rtol=1e-5, atol=1e-5)
    # the α-DPO cache holds length-normalised values: check them against the op on the model itself
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = averaged.data_collator([averaged.train_dataset[i] for i in range(4)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        expect = fused_sequence_logps(hidden, model.lm_head.weight, labels, shift=True, average=True)[:4]
    got = torch.tensor(averaged.train_dataset["ref_chosen_logps"][:4])
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, trl_sum[:4])
    averaged.train()
    assert all(math.isfinite(h["loss"]) for h in _history(averaged))


def test_simpo_runs_without_a_reference(model_dir, dataset, tmp_path):
    trainer = AlphaDPOTrainer(model=model_dir, train_dataset=dataset,
                              args=AlphaDPOConfig(**_common(tmp_path, "s", loss_type="simpo", max_steps=2)))
    assert trainer.ref_model is None and trainer.accelerator._models == []  # no reference loaded, none prepared
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in _history(trainer))


def test_moe_router_loss_matches_stock(tmp_path, dataset):
    model_dir = _save_model(tmp_path / "moe", MixtralConfig, num_local_experts=4, num_experts_per_tok=2,
                            output_router_logits=True, router_aux_loss_coef=0.02)
    kw = dict(loss_type="sigmoid", max_steps=2)
    stock = trl.DPOTrainer(model=model_dir, train_dataset=dataset, args=trl.DPOConfig(**_common(tmp_path, "m1", **kw)))
    stock.train()
    ours = AlphaDPOTrainer(model=model_dir, train_dataset=dataset,
                           args=AlphaDPOConfig(**_common(tmp_path, "m2", **kw), average_log_prob=False))
    ours.train()
    a, b = _history(stock), _history(ours)
    _assert_same_history(a, b, rtol=2e-5, atol=1e-6)
    for x, y in zip(a, b):
        assert y["aux_loss"] == pytest.approx(x["aux_loss"], rel=1e-5)


def test_config_refuses_what_it_does_not_implement(tmp_path):
    out = dict(output_dir=str(tmp_path / "c"), use_cpu=True)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        AlphaDPOConfig(**out, loss_type="hinge")
    with pytest.raises(ValueError, match="one loss type"):
        AlphaDPOConfig(**out, loss_type=["sigmoid", "ipo"])
    for kw, name in ((dict(ld_alpha=0.5), "ld_alpha"), (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
                     (dict(use_weighting=True), "use_weighting"), (dict(loss_weights=[0.5]), "loss_weights"),
                     (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing")):
        with pytest.raises(ValueError, match=name):
            AlphaDPOConfig(**out, **kw)
    with pytest.raises(ValueError, match="kernel_backend"):
        AlphaDPOConfig(**out, kernel_backend="cuda")
    cfg = AlphaDPOConfig(**out, loss_type="dpo")
    assert cfg.loss_type == ["sigmoid"] and cfg.beta == 0.1 and cfg.average_log_prob is False
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(AlphaDPOConfig).parse_args_into_dataclasses(
        ["--output_dir", out["output_dir"], "--use_cpu", "true", "--loss_type", "alpha-dpo", "--alpha", "0.1"])
    assert parsed.loss_type == ["alpha_dpo"] and parsed.alpha == 0.1 and parsed.beta == 2.5
    with pytest.raises(ValueError, match="sync_ref_model"):
        AlphaDPOTrainer(model="unused", train_dataset=None,
                        args=AlphaDPOConfig(**out, loss_type="simpo", sync_ref_model=True))
    with pytest.raises(TypeError, match="AlphaDPOConfig"):
        AlphaDPOTrainer(model="unused", args=trl.DPOConfig(**out), train_dataset=None)


def test_unsupported_head_is_refused(tmp_path, dataset):
    """A config that scales the logits while the model does not: the one-time head check refuses the model."""
    model_dir = _save_model(tmp_path / "odd")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.logit_scale = 0.5  # read as Cohere's scale, but Llama's forward ignores it
    with pytest.raises(ValueError, match="not supported"):
        AlphaDPOTrainer(model=model, train_dataset=dataset, args=AlphaDPOConfig(**_common(tmp_path, "o")))


def test_rows_without_a_scored_token_are_dropped_or_named(model_dir, tmp_path):
    rows = _rows() + [dict(prompt="", chosen="", rejected=" 1 2")]  # chosen row: EOS alone, at position 0
    trainer = AlphaDPOTrainer(model=model_dir, train_dataset=Dataset.from_list(rows),
                              args=AlphaDPOConfig(**_common(tmp_path, "t")))
    assert len(trainer.train_dataset) == len(rows) - 1
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch["completion_mask"][3] = 0
    with pytest.raises(ValueError, match="rejected of pair 1: no completion token"):
        trainer._labels(batch)
    assert LogpsRequest(average=True).backend == "auto"


def test_two_ddp_processes(model_dir, tmp_path):
    """Two gloo processes (torchrun): DPO equals stock TRL step by step under DDP, and α-DPO's margin statistics,
    gathered over the world, are the same on both ranks (tests/trl_ddp_worker.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "trl_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           worker, model_dir, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    for r in ranks:
        _assert_same_history(r["stock"], r["ours"], rtol=2e-5, atol=1e-6)
    assert ranks[0]["alpha"] == ranks[1]["alpha"] and ranks[0]["alpha"][1] > 0


def test_head_check_skips_weights_that_are_not_there(model_dir):
    """ZeRO-3 partitions parameters to empty tensors and FSDP's low-memory loading leaves them on the meta device
    on all ranks but 0: the one-time head check cannot run there and is skipped, not crashed into."""
    from alphadpo_kernels.integrations.trl import _verifiable

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert _verifiable(model)
    with torch.device("meta"):
        assert not _verifiable(AutoModelForCausalLM.from_config(model.config))
    model.lm_head.weight.data = torch.empty(0)
    assert not _verifiable(model)


@pytest.mark.parametrize("pair_loss, extra", [("sigmoid", dict(average_log_prob=False)), ("ipo", {})])
def test_sft_term_reproduces_stock_dpo_trainer_step_by_step(model_dir, dataset, tmp_path, pair_loss, extra):
    """TRL's NLL (RPO) term, ``loss_type=[<pair loss>, "sft"]`` with ``loss_weights``: the same losses, gradient
    norms and weights as stock TRL, step by step, from one fused op call per forward."""
    kw = dict(loss_type=[pair_loss, "sft"], loss_weights=[1.0, 0.5], beta=0.5)
    stock = trl.DPOTrainer(model=model_dir, train_dataset=dataset, args=trl.DPOConfig(**_common(tmp_path, "s", **kw)))
    stock.train()
    ours = AlphaDPOTrainer(model=model_dir, train_dataset=dataset,
                           args=AlphaDPOConfig(**_common(tmp_path, "o", **kw), **extra))
    assert ours.args.loss_type == [pair_loss, "sft"] and ours.alphadpo_loss.nll_weight == 0.5
    ours.train()
    a, b = _history(stock), _history(ours)
    keys = COMPARED if pair_loss == "sigmoid" else ("loss", "grad_norm", "num_tokens")
    _assert_same_history(a, b, rtol=2e-5, atol=1e-6, keys=keys)
    for (name, p), q in zip(stock.model.named_parameters(), ours.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-5), name
    # step 1: policy = reference, so the pair loss is its constant and the rest is the logged NLL, weighted
    first_pair = math.log(2) if pair_loss == "sigmoid" else (1 / (2 * 0.5)) ** 2
    assert b[0]["nll_loss"] > 0 and b[0]["loss"] == pytest.approx(first_pair + 0.5 * b[0]["nll_loss"], rel=1e-5)


def test_config_takes_the_sft_term(tmp_path):
    out = dict(output_dir=str(tmp_path / "c"), use_cpu=True)
    cfg = AlphaDPOConfig(**out, loss_type=["sft", "dpo"], loss_weights=[0.2, 1.0])  # any order, as TRL
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.2] and cfg.nll_weight == 0.2
    assert AlphaDPOConfig(**out, loss_type=["alpha_dpo", "sft"]).nll_weight == 1.0  # TRL's default weights: 1
    assert AlphaDPOConfig(**out).nll_weight == 0.0
    for kw, match in ((dict(loss_type=["sigmoid", "sft"], loss_weights=[0.5, 1.0]), "must be 1"),
                      (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -1.0]), "'sft' weight"),
                      (dict(loss_type=["sft"]), "loss_type must be one of"),
                      (dict(loss_type=["sigmoid", "ipo", "sft"]), "one loss type")):
        with pytest.raises(ValueError, match=match):
            AlphaDPOConfig(**out, **kw)
