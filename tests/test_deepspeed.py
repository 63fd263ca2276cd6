"""``alphadpo-train`` under DeepSpeed ZeRO-3 and ZeRO-2, launched as a user would: ``accelerate launch`` with the
shipped accelerate configs (examples/configs/accelerate-deepspeed-zero{2,3}.yaml), two CPU processes (gloo,
``DS_ACCELERATOR=cpu``), float32, the embedded demo's tiny Llama and task.

- two ZeRO-3 processes (weights partitioned at construction, the reference as its own inference-only ZeRO-3
  engine) equal one plain process on the same global batch: losses, α-DPO's margin statistics, final weights;
- the final model is the optimizer's float32 master weights, equal to what ``zero_to_fp32`` recovers from the
  last checkpoint;
- a run resumed from a ZeRO-3 checkpoint equals the uninterrupted run (with the reference computed online, by
  the reference engine inside the policy's forward);
- two ZeRO-2 processes equal one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
try:
    import deepspeed  # noqa: F401
except Exception as exc:  # ImportError, or a DeepSpeed that cannot find an accelerator
    pytest.skip(f"deepspeed is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "pip install deepspeed", allow_module_level=True)

from conftest import rel_err  # noqa: E402
from helpers import free_port, save_tiny_llama  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(ROOT, "examples", "configs")
# 4 optimizer steps of 2 micro-batches: 4 pairs per process per micro-batch (8 in the one-process run)
STEPS = ["--demo", "--max-steps", "4", "--gradient-accumulation-steps", "2", "--eval-steps", "1000",
         "--logging-steps", "1", "--mixed-precision", "no", "--learning-rate", "1e-3"]
KEYS = ("train/loss", "train/margin_mean", "train/margin_std", "train/rewards/margins", "train/logps/ref_chosen")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny Llama (hidden 32, 2 layers) saved in float32: ZeRO-3 partitions it while loading it."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def launch(config: str, out, model: str, *flags: str) -> dict:
    """``accelerate launch --config_file CONFIG --num_processes 2 -m alphadpo_kernels.train ...`` on the CPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config),
           "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "-m", "alphadpo_kernels.train", *STEPS, "--model-name-or-path", model,
           "--per-device-train-batch-size", "4", "--output-dir", str(out), *flags]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def _log(path) -> list[dict]:
    return [json.loads(x) for x in open(path / "metrics.jsonl") if "train/loss" in x]


def _final(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "final", "model.safetensors"))


def _same_run(a, b, *, rel=1e-5, weights=2e-4) -> None:
    log_a, log_b = _log(a), _log(b)
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == [1, 2, 3, 4]
    for r1, r2 in zip(log_a, log_b):
        for key in KEYS:
            assert r2[key] == pytest.approx(r1[key], rel=rel, abs=1e-6), (r1["step"], key)
    wa, wb = _final(a), _final(b)
    assert wa.keys() == wb.keys()
    for k in wa:  # four Adam steps amplify the reduction-order rounding a little
        assert wb[k].dtype == torch.float32 and rel_err(wb[k], wa[k]) < weights, k


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama):
    from alphadpo_kernels.train.trainer import main

    out = tmp_path_factory.mktemp("one")
    main([*STEPS, "--model-name-or-path", tiny_llama, "--per-device-train-batch-size", "8", "--output-dir", str(out)])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return out


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("zero3")
    summary = launch("accelerate-deepspeed-zero3.yaml", out, tiny_llama, "--save-steps", "2",
                     "--save-final-state", "true",
                     "--reference-mode", "online")
    return out, summary


def test_zero3_two_processes_equal_one_process(one_process, zero3):
    out, summary = zero3
    # really ZeRO-3 over two processes (not two independent single-process copies of the job)
    assert summary["distributed"] == {"type": "DEEPSPEED", "num_processes": 2, "backend": "gloo", "zero_stage": 3,
                                      "reference": "deepspeed-zero3"}
    _same_run(one_process, out)
    assert summary["eval/rewards/accuracies"] == pytest.approx(
        json.loads((one_process / "summary.json").read_text())["eval/rewards/accuracies"], abs=1e-6)


def test_zero3_final_model_is_the_consolidated_master_weights(zero3):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out, _ = zero3
    ckpt = out / "checkpoint-4"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))  # ckpt/latest names the engine's folder
    final = _final(out)
    for k, v in final.items():
        assert torch.equal(v, consolidated["policy." + k]), k
    # the margin statistics are saved with the model's state (buffers of the loss module)
    states = torch.load(next(ckpt.rglob("*rank_0_mp_rank_00_model_states.pt")), map_location="cpu",
                        weights_only=False)["module"]
    log = _log(out)[-1]
    assert float(states["loss_fn.margin_mean"]) == pytest.approx(log["train/margin_mean"], rel=1e-6)
    assert float(states["loss_fn.margin_std"]) == pytest.approx(log["train/margin_std"], rel=1e-6)


def test_zero3_resume_equals_uninterrupted(zero3, tiny_llama, tmp_path):
    full, _ = zero3
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    launch("accelerate-deepspeed-zero3.yaml", part, tiny_llama, "--save-steps", "2", "--reference-mode", "online",
           "--resume", "latest")
    resumed, uninterrupted = _log(part), _log(full)
    assert [r["step"] for r in resumed] == [3, 4]
    for r1, r2 in zip(uninterrupted[2:], resumed):
        for key in KEYS:
            assert r2[key] == r1[key], (r1["step"], key)
    a, b = _final(full), _final(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_zero2_two_processes_equal_one_process(one_process, tiny_llama, tmp_path):
    summary = launch("accelerate-deepspeed-zero2.yaml", tmp_path, tiny_llama, "--save-steps", "1000")
    assert summary["distributed"] == {"type": "DEEPSPEED", "num_processes": 2, "backend": "gloo", "zero_stage": 2,
                                      "reference": "plain"}
    _same_run(one_process, tmp_path)


def test_deepspeed_launch_refuses_what_it_cannot_run(monkeypatch, tmp_path):
    """Checked before any work, one line, exit status 2: bf16 weights / the Kahan optimizer (ZeRO keeps float32
    masters itself), and a DeepSpeed config whose fixed batch size contradicts the flags."""
    import types

    from alphadpo_kernels.train.config import ConfigError, parse_config
    from alphadpo_kernels.train.trainer import _fill_deepspeed_config

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="under DeepSpeed keep --weights-dtype fp32"):
        parse_config(["--demo", "--weights-dtype", "bf16", "--optimizer", "adamw_kahan",
                      "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    cfg = parse_config(["--demo", "--output-dir", str(tmp_path / "y"), "--max-grad-norm", "0.5"])
    plugin = types.SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto",
                                                     "gradient_clipping": "auto"})
    acc = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))
    _fill_deepspeed_config(acc, cfg)
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 0.5,
                                       "gradient_accumulation_steps": 1}
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 4
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4, this run's flags 16"):
        _fill_deepspeed_config(acc, cfg)
    proc = subprocess.run([sys.executable, "-m", "alphadpo_kernels.train", "--demo", "--weights-dtype", "bf16",
                           "--optimizer", "adamw_kahan", "--output-dir", str(tmp_path / "z")], capture_output=True,
                          text=True, env=dict(os.environ, ACCELERATE_USE_DEEPSPEED="true"), cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_alpha_dpo_trainer_zero3_two_processes_equal_one_process(tmp_path):
    """``AlphaDPOTrainer`` (TRL) under ZeRO-3 on two processes (tests/trl_zero3_worker.py) equals one plain process
    on the same global batch: losses, grad norms, rewards, margin statistics, saved weights."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    from trl_zero3_worker import COMPARED, args, history, rows

    from alphadpo_kernels.integrations.trl import AlphaDPOTrainer
    from alphadpo_kernels.train.demo import ASSETS

    tok = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    one = AlphaDPOTrainer(model=str(model_dir), train_dataset=Dataset.from_list(rows()),
                          args=args(str(tmp_path / "one"), 4, use_cpu=True))
    one.train()
    one.save_model(str(tmp_path / "one" / "final"))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)

    two = tmp_path / "two"
    worker = os.path.join(os.path.dirname(__file__), "trl_zero3_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           worker, str(model_dir), str(two)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["stage"] == 3 for r in ranks)
    assert ranks[0]["stats"] == ranks[1]["stats"]
    expected = history(one)
    assert len(expected) == len(ranks[0]["history"]) == 3
    for step, (a, b) in enumerate(zip(expected, ranks[0]["history"])):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (step, key)
    assert ranks[0]["stats"] == pytest.approx([float(one.alphadpo_loss.margin_mean),
                                               float(one.alphadpo_loss.margin_std)], rel=2e-5)
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(two / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert rel_err(wb[k], wa[k]) < 2e-4, k
