"""The trainer at real scale, on the CPU: what a real 8B run would hit and a 2-core demo does not show.

ZeRO-3 and FSDP cannot run here; their handling is tested through the code that decides it (the reference's
placement, the inference engine's config, the gathered final save). GPU-side rounding that depends on a batch's
shape is simulated by perturbing the hidden states as a function of the batch shape, as cuBLAS picking another
kernel for another shape would.
"""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from alphadpo_kernels.train import data as train_data  # noqa: E402
from alphadpo_kernels.train import modeling  # noqa: E402
from alphadpo_kernels.train.config import TrainConfig, parse_config  # noqa: E402
from alphadpo_kernels.train.demo import ASSETS  # noqa: E402
from alphadpo_kernels.train.reference import reference_placement, zero3_inference_config  # noqa: E402
from alphadpo_kernels.train.trainer import disable_dropout, main, plan_steps, save_policy  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
QUICK = ["--demo", "--eval-steps", "1000", "--save-steps", "1000", "--logging-steps", "1"]


def _log(path, key="train/loss"):
    return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl")) if key in line]


@pytest.fixture
def shape_dependent_rounding(monkeypatch):
    """Hidden states nudged by an amount that depends on the batch's shape (a GPU picks a GEMM kernel per shape,
    and bf16 results differ with it): the same pair scored in differently shaped batches gets other numbers."""
    real = modeling.last_hidden_states

    def nudged(model, input_ids, attention_mask, position_ids=None):
        hidden = real(model, input_ids, attention_mask, position_ids)
        return hidden + 1e-3 * ((input_ids.shape[0] * 31 + input_ids.shape[1]) % 7)

    monkeypatch.setattr(modeling, "last_hidden_states", nudged)


def test_learning_rate_zero_gives_exactly_zero_margins(tmp_path, shape_dependent_rounding):
    """Default settings (bf16 autocast, float32 master weights, precomputed reference, eval batches of another
    size than training's), learning rate 0: policy == reference, so every margin is exactly 0, the margin
    statistics stay exactly 0 and the policy / reference log-probs are equal, in training and in evaluation."""
    main(QUICK + ["--max-steps", "6", "--learning-rate", "0", "--mixed-precision", "bf16",
                  "--gradient-checkpointing", "true", "--eval-steps", "3", "--output-dir", str(tmp_path)])
    train = _log(tmp_path)
    assert len(train) == 6
    for r in train:
        assert r["train/margin_mean"] == 0.0 and r["train/margin_std"] == 0.0, r
        assert r["train/logps/chosen"] == r["train/logps/ref_chosen"]
        assert r["train/logps/rejected"] == r["train/logps/ref_rejected"]
    evals = _log(tmp_path, "eval/loss")
    assert evals and all(r["eval/logps/chosen"] == r["eval/logps/ref_chosen"] for r in evals)


def test_the_old_eval_sized_reference_would_have_carried_noise(shape_dependent_rounding):
    """The check above can fail: the same pairs scored in an eval-sized batch and in training-sized batches
    differ under shape-dependent rounding (what the precompute in eval batches used to feed α-DPO)."""
    from transformers import AutoTokenizer

    from alphadpo_kernels import FusedAlphaDPOLoss
    from alphadpo_kernels.train.demo import build_demo_model

    tok = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))
    rows = [json.loads(line) for line in open(os.path.join(ASSETS, "sort_train.jsonl"))][:32]
    ds = train_data.PreferenceDataset(rows, tok, 48, 24)
    collate = train_data.PreferenceCollator(tok.pad_token_id)
    model, loss_fn = build_demo_model(len(tok), 0), FusedAlphaDPOLoss(shift=True)
    whole = modeling.reference_logps(model, collate([ds[i] for i in range(32)]), loss_fn)
    parts = [modeling.reference_logps(model, collate([ds[i] for i in range(s, s + 16)]), loss_fn) for s in (0, 16)]
    in_sixteens = torch.cat([torch.cat([p[:16] for p in parts]), torch.cat([p[16:] for p in parts])])
    assert (whole - in_sixteens).abs().max() > 1e-4


def test_the_reference_cache_is_keyed_on_what_changes_the_numbers(tmp_path):
    """Two runs in one output folder with other precision settings must not share reference values."""
    args = QUICK + ["--max-steps", "2", "--output-dir", str(tmp_path), "--overwrite", "true"]
    main(args + ["--mixed-precision", "no"])
    fp32_run = _log(tmp_path)
    main(args + ["--mixed-precision", "bf16"])
    bf16_run = _log(tmp_path)
    caches = sorted(os.listdir(tmp_path / "reference_logps"))
    assert len([c for c in caches if c.endswith("-train.pt")]) == 2
    # each run's reference is its own policy at step 1 (no reuse of the other precision's values)
    for run in (fp32_run, bf16_run):
        assert len(run) == 2 and run[0]["train/logps/chosen"] == run[0]["train/logps/ref_chosen"]
    assert fp32_run[0]["train/logps/ref_chosen"] != bf16_run[0]["train/logps/ref_chosen"]
    main(args + ["--mixed-precision", "no", "--seed", "7"])  # other weights (the demo model's seed): a new key
    assert len([c for c in os.listdir(tmp_path / "reference_logps") if c.endswith("-train.pt")]) == 3


def test_steps_round_down_like_transformers_trainer(tmp_path):
    assert plan_steps(10, TrainConfig(gradient_accumulation_steps=3)) == (3, 3)  # was 4: a partial last step
    assert plan_steps(10, TrainConfig(gradient_accumulation_steps=3, num_train_epochs=1.5)) == (3, 5)
    assert plan_steps(2, TrainConfig(gradient_accumulation_steps=3)) == (1, 1)
    assert plan_steps(10, TrainConfig(max_steps=7)) == (10 // 16 or 1, 7)
    # the demo: 2048 pairs / 16 a batch = 128 batches, 3 per step -> 42 full steps in one epoch
    summary = main(QUICK + ["--max-steps", "-1", "--num-train-epochs", "1", "--gradient-accumulation-steps", "3",
                            "--logging-steps", "100", "--output-dir", str(tmp_path)])
    assert summary["steps"] == 42


def test_logged_metrics_are_window_means_with_the_gradient_norm(tmp_path):
    every = _log_run(tmp_path / "every", "1")
    windowed = _log_run(tmp_path / "window", "3")
    assert [r["step"] for r in windowed] == [3, 6]
    for w, lo in ((windowed[0], every[0:3]), (windowed[1], every[3:6])):
        for key in ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen"):
            assert w[key] == pytest.approx(sum(r[key] for r in lo) / 3, rel=1e-5, abs=1e-7), key
        assert w["train/grad_norm"] == pytest.approx(lo[-1]["train/grad_norm"], rel=1e-6)  # the step's own norm
    assert all(r["train/grad_norm"] > 0 for r in every)


def _log_run(out, logging_steps):
    main(QUICK + ["--max-steps", "6", "--logging-steps", logging_steps, "--output-dir", str(out)])
    return _log(out)


def test_tokenized_data_is_cached_and_memory_mapped(tmp_path, monkeypatch):
    main(QUICK + ["--max-steps", "1", "--output-dir", str(tmp_path)])
    cached = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "tokenized") for f in fs]
    assert {os.path.basename(f) for f in cached} == {"tokens.npy", "offsets.npy", "prompt_lens.npy"}

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(train_data, "tokenize_pair", no_tokenizing)
    main(QUICK + ["--max-steps", "1", "--output-dir", str(tmp_path), "--overwrite", "true"])  # loads the cache
    from alphadpo_kernels.train.trainer import build_datasets

    cfg = parse_config(QUICK + ["--output-dir", str(tmp_path)])
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)
    train_ds, eval_ds = build_datasets(cfg, tok, Accelerator(cpu=True))
    assert isinstance(train_ds.tokens, np.memmap) and len(train_ds) == 2048 and len(eval_ds) == 256


def test_the_data_cache_follows_the_tokenization_settings(tmp_path):
    main(QUICK + ["--max-steps", "1", "--output-dir", str(tmp_path)])
    main(QUICK + ["--max-steps", "1", "--max-length", "40", "--output-dir", str(tmp_path), "--overwrite", "true"])
    assert len(os.listdir(tmp_path / "tokenized")) == 2


def test_dataset_round_trips_the_tokenized_pairs():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))
    rows = [json.loads(line) for line in open(os.path.join(ASSETS, "sort_eval.jsonl"))][:5]
    ds = train_data.PreferenceDataset(rows, tok, 48, 24)
    for i, r in enumerate(rows):
        want = train_data.tokenize_pair(r, tok, 48, 24)
        got = ds[i]
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert got[key] == want[key], key


def test_final_save_gathers_on_every_rank_and_writes_on_the_main_one(tmp_path):
    """Under ZeRO-3 / FSDP each rank holds a shard: the full state dict is a collective every rank must join,
    and only the main process writes."""
    from alphadpo_kernels import FusedAlphaDPOLoss
    from alphadpo_kernels.train.demo import build_demo_model
    from alphadpo_kernels.train.modeling import PreferenceModel

    model = PreferenceModel(build_demo_model(40, 0), FusedAlphaDPOLoss(shift=True))
    calls = []

    class Rank:
        def __init__(self, main):
            self.is_main_process = main

        def get_state_dict(self, m):
            calls.append(self.is_main_process)
            return m.state_dict()

        def unwrap_model(self, m):
            return m

        def wait_for_everyone(self):
            pass

    tok = types.SimpleNamespace(save_pretrained=lambda path: open(os.path.join(path, "tok.json"), "w").close())
    save_policy(Rank(False), model, tok, str(tmp_path / "other"))
    assert calls == [False] and not (tmp_path / "other").exists()
    save_policy(Rank(True), model, tok, str(tmp_path / "main"))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "main" / "model.safetensors")
    own = model.policy.state_dict()
    assert saved.keys() == {k for k in own if k != "lm_head.weight" or k in saved}
    for k, v in saved.items():
        assert torch.equal(v, own[k]), k


def _fake_accelerator(kind, stage=None):
    from accelerate.utils import DistributedType

    plugin = types.SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}} if stage else {},
                                   zero_stage=stage)
    state = types.SimpleNamespace(distributed_type=getattr(DistributedType, kind), deepspeed_plugin=plugin)
    return types.SimpleNamespace(state=state)


@pytest.mark.parametrize("kind,stage,expected", [("NO", None, "plain"), ("MULTI_CPU", None, "plain"),
                                                 ("MULTI_GPU", None, "plain"), ("FSDP", None, "fsdp"),
                                                 ("DEEPSPEED", 2, "plain"), ("DEEPSPEED", 3, "deepspeed-zero3")])
def test_reference_placement(kind, stage, expected):
    assert reference_placement(_fake_accelerator(kind, stage)) == expected


def test_zero3_inference_config_drops_training_and_fills_auto():
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto", "offload_optimizer": {"device": "cpu"}},
          "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "train_micro_batch_size_per_gpu": "auto",
          "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "bf16": {"enabled": True}}
    cfg = zero3_inference_config(ds, hidden_size=4096, micro_batch=2, world_size=4)
    assert "optimizer" not in cfg and "scheduler" not in cfg and "gradient_clipping" not in cfg
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 4096**2 and "offload_optimizer" not in z
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["train_batch_size"] == 8
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["bf16"] == {"enabled": True}
    assert "auto" not in json.dumps(cfg)
    assert ds["optimizer"] == {"type": "AdamW"}  # the run's own config is left alone


def test_dropout_is_off_in_train_mode():
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, resid_pdrop=0.3, embd_pdrop=0.3,
                        attention_dropout=0.3, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(1, 64, (2, 9))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is on at first
    disable_dropout(model).train()
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.resid_pdrop == model.config.attention_dropout == 0.0


def test_defaults_follow_the_released_configs():
    cfg = TrainConfig()
    assert cfg.gradient_checkpointing is True and cfg.logging_steps == 5 and cfg.eval_steps == 400
    assert cfg.weights_dtype == "fp32" and cfg.mixed_precision == "bf16" and cfg.save_final_state is False
    assert (cfg.beta, cfg.gamma_beta_ratio, cfg.alpha, cfg.learning_rate) == (2.5, 0.6, 0.2, 1e-6)


@pytest.mark.parametrize("name,beta,ratio,alpha,lr", [
    ("llama-3-8b-instruct-alpha-dpo", 2.5, 0.6, 0.2, 1e-6),
    ("llama-3-8b-instruct-alpha-dpo-v2", 10, 0.4, 0.2, 1e-6),
    ("gemma-2-9b-it-alpha-dpo", 10, 0.4, 0.05, 8e-7),
    ("mistral-7b-instruct-alpha-dpo", 2.5, 0.15, 0.05, 6e-7),
])
def test_released_configs_are_shipped_and_load(name, beta, ratio, alpha, lr):
    cfg = parse_config([os.path.join(EXAMPLES, f"{name}.yaml")])
    assert (cfg.beta, cfg.gamma_beta_ratio, cfg.alpha, cfg.learning_rate) == (beta, ratio, alpha, lr)
    assert cfg.per_device_train_batch_size * 4 * cfg.gradient_accumulation_steps == 128
    assert (cfg.max_length, cfg.max_prompt_length, cfg.num_train_epochs) == (2048, 1800, 1)
    assert cfg.weights_dtype == "fp32" and cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    assert (cfg.chat_template is not None) == (name.startswith(("gemma", "mistral")))


@pytest.mark.parametrize("name", ["gemma-2-9b-it-alpha-dpo", "mistral-7b-instruct-alpha-dpo"])
def test_released_chat_templates_template_a_lone_assistant_turn(name, tmp_path):
    """The released runs template each response on its own, which the hub's Gemma template refuses; the shipped
    configs' templates (from the released YAML and run script) accept it, from the config or from a file."""
    from transformers import AutoTokenizer

    from alphadpo_kernels.train.trainer import _load_tokenizer

    template = parse_config([os.path.join(EXAMPLES, f"{name}.yaml")]).chat_template
    path = tmp_path / "template.jinja"
    path.write_text(template)
    for value in (template, str(path)):
        tok = _load_tokenizer(TrainConfig(tokenizer_name_or_path=os.path.join(ASSETS, "tokenizer"),
                                          chat_template=value))
        assert tok.chat_template == template
        text = tok.apply_chat_template([{"role": "assistant", "content": "1 2 3"}], tokenize=False)
        assert "1 2 3" in text
    ex = {"chosen": [{"role": "user", "content": "sort 3 1 2"}, {"role": "assistant", "content": "1 2 3"}],
          "rejected": [{"role": "user", "content": "sort 3 1 2"}, {"role": "assistant", "content": "2 1 3"}]}
    out = train_data.tokenize_pair(ex, tok, 64, 32)
    assert out["chosen_labels"].count(-100) > 0 and len(out["chosen_input_ids"]) > 4
    assert AutoTokenizer  # imported for the tokenizer class registry


def test_hub_data_sets_by_name_and_split(monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: calls.append((name, split)) or [
        {"prompt": "p", "chosen": "a", "rejected": "b"}]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert train_data.load_pairs("princeton-nlp/llama3-ultrafeedback")[0]["chosen"] == "a"
    train_data.load_pairs("princeton-nlp/llama3-ultrafeedback:test")
    train_data.load_pairs("princeton-nlp/llama3-ultrafeedback", default_split="test")
    assert calls == [("princeton-nlp/llama3-ultrafeedback", "train"), ("princeton-nlp/llama3-ultrafeedback", "test"),
                     ("princeton-nlp/llama3-ultrafeedback", "test")]
    with pytest.raises(FileNotFoundError):
        train_data.load_pairs("./missing.jsonl")
