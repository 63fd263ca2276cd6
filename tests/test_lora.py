"""LoRA (PEFT): ``alphadpo-train --lora-r ...`` trains adapters only, its reference is the base model with the
adapters switched off (no second copy), only the adapters are saved, and the frozen LM head makes the fused loss's
backward compute ``dH`` only (two GEMM units, not three); ``AlphaDPOTrainer`` with a ``peft_config`` equals stock
``trl.DPOTrainer`` with the same LoRA step for step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

from alphadpo_kernels import FusedAlphaDPOLoss  # noqa: E402
from alphadpo_kernels.ops.sequence_logps.instrument import count_gemm_work  # noqa: E402
from alphadpo_kernels.train import trainer as trainer_module  # noqa: E402
from alphadpo_kernels.train.config import ConfigError, build_parser, parse_config  # noqa: E402
from alphadpo_kernels.train.data import PreferenceCollator  # noqa: E402
from alphadpo_kernels.train.demo import ASSETS, build_demo_model  # noqa: E402
from alphadpo_kernels.train.modeling import PreferenceModel  # noqa: E402
from alphadpo_kernels.train.trainer import apply_lora, main  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj,v_proj"]


def test_lora_run_uses_the_base_as_reference_and_saves_only_the_adapters(tmp_path, monkeypatch):
    def no_second_copy(*a, **k):
        raise AssertionError("a separate reference model was loaded")

    monkeypatch.setattr(trainer_module, "_load_reference", no_second_copy)
    main(["--demo", *LORA, "--max-steps", "3", "--eval-steps", "1000", "--logging-steps", "1",
          "--output-dir", str(tmp_path)])
    records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    start = records[0]
    assert start["step"] == 0  # the adapters start at zero: the policy is exactly the base (the reference)
    assert start["eval/logps/chosen"] == start["eval/logps/ref_chosen"]
    assert start["eval/logps/rejected"] == start["eval/logps/ref_rejected"]
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 3 and train[-1]["train/margin_std"] > 0  # α-DPO's policy/reference margins moved
    final = tmp_path / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    from safetensors.torch import load_file

    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert {k.split(".")[-3] for k in saved} == {"q_proj", "v_proj"}
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4


def _batch(tokenizer_vocab: int):
    g = torch.Generator().manual_seed(1)
    items = []
    for i, (n_prompt, n_c, n_r) in enumerate(((3, 4, 6), (5, 7, 2))):
        prompt = torch.randint(3, tokenizer_vocab, (n_prompt,), generator=g).tolist()
        c, r = (torch.randint(3, tokenizer_vocab, (n,), generator=g).tolist() for n in (n_c, n_r))
        items.append(dict(index=i, chosen_input_ids=prompt + c, rejected_input_ids=prompt + r,
                          chosen_labels=[-100] * n_prompt + c, rejected_labels=[-100] * n_prompt + r))
    batch = PreferenceCollator(0)(items)
    return dict(batch, ref_chosen_logps=torch.tensor([-3.0, -2.5]), ref_rejected_logps=torch.tensor([-2.8, -3.1]))


@pytest.mark.parametrize("lora", [True, False])
def test_frozen_head_takes_the_dh_only_backward(lora):
    """With LoRA the head is frozen: the fused op's backward is two GEMM units (recompute the logits, dH), where
    full fine-tuning takes three (and dW)."""
    vocab = 40
    policy = build_demo_model(vocab, seed=0).float()
    if lora:
        policy = apply_lora(types.SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                                                  lora_target_modules="all-linear", seed=0), policy)
        assert not policy.get_output_embeddings().weight.requires_grad
    model = PreferenceModel(policy, FusedAlphaDPOLoss(shift=True), backend="torch")
    batch = _batch(vocab)
    out = model(batch)
    with count_gemm_work() as log:
        out.loss.backward()
    live = int((batch["labels"][:, 1:] != -100).sum())
    unit = 2 * live * vocab * policy.config.hidden_size
    assert log.flops / unit == (2 if lora else 3)


def test_lora_flags_are_checked_before_any_work(tmp_path):
    help_text = build_parser().format_help()
    for flag in ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules"):
        assert flag in help_text
    bad = {
        ("--lora-alpha", "8"): "lora_alpha set without lora_r",
        ("--lora-r", "-1"): "lora_r must be at least 0",
        ("--lora-r", "4", "--lora-dropout", "1"): r"lora_dropout must be in \[0, 1\)",
        ("--lora-r", "4", "--lora-alpha", "0"): "lora_alpha must be positive",
        ("--lora-r", "4", "--lora-target-modules", "q_proj,lm_head"): "must not include the LM head",
        ("--lora-r", "4", "--lora-target-modules", " , "): "lora_target_modules is empty",
        ("--lora-r", "4", "--ref-model-name-or-path", ASSETS): "does not apply with LoRA",
    }
    for flags, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            parse_config(["--demo", *flags, "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    proc = subprocess.run([sys.executable, "-m", "alphadpo_kernels.train", "--demo", "--lora-dropout", "0.1",
                           "--output-dir", str(tmp_path / "y")], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "lora_dropout set without lora_r" in proc.stderr and not (tmp_path / "y").exists()


COMPARED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")


def test_alpha_dpo_trainer_with_peft_matches_stock_dpo_trainer(tmp_path):
    """The same LoRA (PEFT's ``peft_config``), DPO with summed log-probs: AlphaDPOTrainer's reference is the model
    with its adapter switched off, as TRL's; losses, grad norms, rewards and log-probs agree step by step."""
    trl = pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    from trl_zero3_worker import rows

    from alphadpo_kernels.integrations.trl import AlphaDPOConfig, AlphaDPOTrainer

    tok = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model_dir = str(tmp_path / "model")
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ds = Dataset.from_list(rows())

    def common(name):
        return dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                    logging_steps=1, report_to="none", save_strategy="no", seed=0, use_cpu=True, bf16=False,
                    disable_tqdm=True, loss_type="sigmoid")

    def lora():
        return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")

    histories = []
    for make in (lambda: trl.DPOTrainer(model=model_dir, train_dataset=ds, peft_config=lora(),
                                        args=trl.DPOConfig(**common("stock"))),
                 lambda: AlphaDPOTrainer(model=model_dir, train_dataset=ds, peft_config=lora(),
                                         args=AlphaDPOConfig(**common("ours"), average_log_prob=False))):
        torch.manual_seed(0)
        trainer = make()
        trainer.train()
        histories.append([h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h])
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    stock, ours = histories
    assert len(stock) == len(ours) == 3
    assert stock[-1]["rewards/margins"] != 0  # the adapters moved
    for step, (a, b) in enumerate(zip(stock, ours)):
        for key in COMPARED:
            assert math.isclose(a[key], b[key], rel_tol=2e-5, abs_tol=1e-6), (step, key, a[key], b[key])


def test_lora_online_reference_matches_precomputed(tmp_path):
    """--reference-mode online runs the policy's own module with its adapters off inside each training step: the
    same numbers as the precomputed reference."""
    steps = [*LORA, "--max-steps", "3", "--eval-steps", "1000", "--save-steps", "1000", "--logging-steps", "1",
             "--gradient-checkpointing", "true"]
    main(["--demo", *steps, "--output-dir", str(tmp_path / "pre")])
    main(["--demo", *steps, "--reference-mode", "online", "--output-dir", str(tmp_path / "online")])
    pre = [json.loads(x) for x in open(tmp_path / "pre" / "metrics.jsonl") if "train/loss" in x]
    online = [json.loads(x) for x in open(tmp_path / "online" / "metrics.jsonl") if "train/loss" in x]
    assert len(pre) == len(online) == 3
    for a, b in zip(pre, online):
        for key in ("train/loss", "train/logps/ref_chosen", "train/logps/ref_rejected", "train/margin_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_lora_two_processes_agree_with_one(tmp_path):
    """Two gloo processes (torchrun, data parallel) with LoRA follow the one-process run on the same global batch."""
    import socket

    steps = ["--demo", *LORA, "--max-steps", "3", "--eval-steps", "1000", "--save-steps", "1000",
             "--logging-steps", "1"]
    main([*steps, "--per-device-train-batch-size", "16", "--output-dir", str(tmp_path / "one")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "alphadpo_kernels.train", *steps, "--per-device-train-batch-size", "8",
           "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl") if "train/loss" in x]
    two = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl") if "train/loss" in x]
    assert len(one) == len(two) == 3
    # α-DPO divides the margins by their running std, which is tiny in the first steps: the two runs' different
    # reduction orders show at the 1e-5 level by step 3
    for a, b in zip(one, two):
        for key in ("train/loss", "train/margin_mean", "train/margin_std", "train/rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-6), (a["step"], key)
    from safetensors.torch import load_file

    from conftest import rel_err

    wa = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert rel_err(wb[k], wa[k]) < 2e-4, k
