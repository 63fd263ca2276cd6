"""Real runs must train at the released learning rates (lr ~1e-6), where an Adam step is far below half a bf16
ulp of an ordinary weight: float32 master weights by default, bf16 weights only with a Kahan-compensated AdamW.

A tiny Llama whose matrix weights have a trained model's magnitude (std 0.05) is saved in float32 and trained by
``alphadpo-train`` on one fixed batch (the same pairs every step, so changes come from training, not data), against
the same run entirely in float32 (``--mixed-precision no``). Compared: the fraction of matrix weights that moved,
the direction of the weight update (cosine with the float32 run's), and the trajectory of the mean reward margin.
A bf16-weights run with plain AdamW (refused by the trainer, forced here) shows what the checks catch.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("optimi")

from alphadpo_kernels.train import config as train_config  # noqa: E402
from alphadpo_kernels.train.demo import ASSETS, build_demo_model  # noqa: E402
from alphadpo_kernels.train.trainer import main  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A float32 tiny Llama with matrix weights of std 0.05, its tokenizer, and 8 preference pairs."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("precision")
    tok = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))
    model = build_demo_model(len(tok), 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(os.path.join(ASSETS, "sort_train.jsonl")) as src, open(root / "train.jsonl", "w") as dst:
        dst.writelines(src.readlines()[:8])
    return root


def _train(root, name, steps, *flags):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # a fresh accelerate state per run: each run sets its own precision
    out = root / name
    main(["--model-name-or-path", str(root / "model"), "--train-file", str(root / "train.jsonl"),
          "--max-steps", str(steps), "--learning-rate", "1e-6", "--warmup-ratio", "0",
          "--per-device-train-batch-size", "8", "--gradient-accumulation-steps", "1", "--eval-fraction", "0",
          "--max-length", "48", "--max-prompt-length", "24", "--logging-steps", "1", "--save-final-state", "true",
          "--output-dir", str(out), *flags])
    log = [json.loads(line) for line in open(out / "metrics.jsonl") if "train/loss" in line]
    return out, log


def _matrices(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=None)
    return {n: p.detach() for n, p in model.named_parameters() if p.dim() == 2}


def _kahan_weights(out) -> dict[str, torch.Tensor]:
    """The weights an optimi Kahan run carries: the bf16 weight plus its compensation (optimizer state)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=None)
    ckpt = sorted(glob.glob(str(out / "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))[-1]
    state = torch.load(os.path.join(ckpt, "optimizer.bin"), weights_only=False)["state"]
    out_w = {}
    for i, (name, p) in enumerate(model.named_parameters()):  # the optimizer's parameter order
        if p.dim() == 2:
            out_w[name] = p.detach().float() + state[i]["kahan_comp"].float()
    return out_w


def _update(final: dict, start: dict) -> torch.Tensor:
    return torch.cat([(final[n].float() - start[n].to(final[n].dtype).float()).flatten() for n in start])


def _moved(update: torch.Tensor) -> float:
    return float((update != 0).float().mean())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _margin_change(log) -> float:
    return log[-1]["train/rewards/margins"] - log[0]["train/rewards/margins"]


@pytest.fixture
def plain_bf16_allowed(monkeypatch):
    """Lift the refusal, to show what it prevents."""
    monkeypatch.setattr(train_config.TrainConfig, "validate", lambda self: self)


def test_default_float32_master_weights_follow_the_float32_run(run_dir, plain_bf16_allowed):
    """Defaults (bf16 autocast, float32 master weights, AdamW): 5 steps at lr 1e-6 move (nearly) every matrix
    weight in the float32 run's direction, and the reward margins move with it (within 25%)."""
    start = _matrices(run_dir / "model")
    ref_out, ref_log = _train(run_dir, "fp32-5", 5, "--mixed-precision", "no")
    out, log = _train(run_dir, "default-5", 5)
    ref_upd, upd = _update(_matrices(ref_out / "final"), start), _update(_matrices(out / "final"), start)
    assert _moved(ref_upd) > 0.99 and _moved(upd) > 0.95
    assert _cos(upd, ref_upd) > 0.9
    assert _margin_change(ref_log) > 0 and abs(_margin_change(log) / _margin_change(ref_log) - 1) < 0.25
    # what the old default did (bf16 weights, plain AdamW): almost nothing moves
    bad_out, _ = _train(run_dir, "bf16-plain-5", 5, "--weights-dtype", "bf16")
    assert _moved(_update(_matrices(bad_out / "final"), start)) < 0.05


def test_bf16_weights_with_kahan_carry_every_update(run_dir, plain_bf16_allowed):
    """--weights-dtype bf16 --optimizer adamw_kahan, 100 steps at lr 1e-6: the weights the optimizer carries
    (bf16 weight + Kahan compensation) follow the float32 run (cosine > 0.9, norm within 20%). The bf16 weights
    the forward uses move in whole ulps, so the reward margins lag: at least 15% of the float32 run's change here
    (about 30% measured), where plain AdamW on bf16 weights gets under 5%."""
    start = _matrices(run_dir / "model")
    ref_out, ref_log = _train(run_dir, "fp32-100", 100, "--mixed-precision", "no")
    out, log = _train(run_dir, "kahan-100", 100, "--weights-dtype", "bf16", "--optimizer", "adamw_kahan")
    start_bf16 = {n: w.bfloat16().float() for n, w in start.items()}  # where a bf16-weights run starts from
    ref_upd, upd = _update(_matrices(ref_out / "final"), start), _update(_kahan_weights(out), start_bf16)
    assert _moved(upd) > 0.95 and _cos(upd, ref_upd) > 0.9 and 0.8 < float(upd.norm() / ref_upd.norm()) < 1.2
    assert _margin_change(log) > 0.15 * _margin_change(ref_log) > 0
    bad_out, bad_log = _train(run_dir, "bf16-plain-100", 100, "--weights-dtype", "bf16")
    assert abs(_margin_change(bad_log)) < 0.05 * _margin_change(ref_log)


def test_bf16_weights_with_plain_adamw_are_refused(tmp_path):
    with pytest.raises(ValueError, match="weights_dtype='bf16' needs optimizer='adamw_kahan'.*half a bf16 ulp"):
        main(["--demo", "--weights-dtype", "bf16", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="argument --weights-dtype: invalid choice: 'fp16'"):
        main(["--demo", "--weights-dtype", "fp16", "--output-dir", str(tmp_path)])
