"""The trainer: the demo end to end, tokenization, fused vs plain logits, exact resume, two processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from alphadpo_kernels import FusedAlphaDPOLoss  # noqa: E402
from alphadpo_kernels.losses import alpha_dpo_head  # noqa: E402
from alphadpo_kernels.train.data import PreferenceCollator, PreferenceDataset, tokenize_pair  # noqa: E402
from alphadpo_kernels.train.demo import ASSETS, build_demo_model  # noqa: E402
from alphadpo_kernels.train.modeling import PreferenceModel  # noqa: E402
from alphadpo_kernels.train.trainer import main  # noqa: E402
from conftest import rel_err  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenization_and_masks_on_a_fixed_example(tokenizer):
    user = {"role": "user", "content": "sort these : 3 1 2"}
    ex = {"prompt": "sort these : 3 1 2",
          "chosen": [user, {"role": "assistant", "content": "1 2 3"}],
          "rejected": [user, {"role": "assistant", "content": "2 1 3"}]}
    out = tokenize_pair(ex, tokenizer, max_length=64, max_prompt_length=32)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = [bos] + _ids(tokenizer, "<|user|> sort these : 3 1 2 <|end|>")
    chosen = _ids(tokenizer, "<|assistant|> 1 2 3 <|end|>") + [eos]  # the response carries the header; EOS added
    assert out["chosen_input_ids"] == prompt + chosen
    assert out["chosen_labels"] == [-100] * len(prompt) + chosen
    assert out["rejected_input_ids"][len(prompt):] == _ids(tokenizer, "<|assistant|> 2 1 3 <|end|>") + [eos]


def test_truncation_keeps_the_prompt_end_then_cuts_responses(tokenizer):
    ex = {"prompt": "sort these : 1 2 3 4 5 6 7 8 9", "chosen": " 1 2 3 4 5 6", "rejected": " 6 5 4 3 2 1 0 9"}
    out = tokenize_pair(ex, tokenizer, max_length=12, max_prompt_length=5)
    assert out["chosen_labels"][:5] == [-100] * 5
    assert out["chosen_input_ids"][:5] == _ids(tokenizer, "5 6 7 8 9")  # the prompt's last 5 tokens, no BOS left
    assert len(out["rejected_input_ids"]) == 5 + 7  # response cut to max_length - max_prompt_length
    # strings are used verbatim; EOS appended when missing
    short = tokenize_pair({"prompt": "sort these : 2 1", "chosen": " 1 2", "rejected": " 2 1"}, tokenizer, 64, 32)
    assert short["chosen_input_ids"][-1] == tokenizer.eos_token_id


def test_fused_path_equals_plain_logits_path(tokenizer):
    rows = [json.loads(line) for line in open(os.path.join(ASSETS, "sort_eval.jsonl"))][:6]
    ds = PreferenceDataset(rows, tokenizer, 48, 24)
    batch = PreferenceCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    ref_c, ref_r = -torch.rand(6) - 2, -torch.rand(6) - 2
    batch.update(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    model = build_demo_model(len(tokenizer), seed=3)
    loss_fn = FusedAlphaDPOLoss(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2, shift=True)
    fused = PreferenceModel(model, loss_fn)(batch)
    fused_grads = torch.autograd.grad(fused.loss, list(model.parameters()))

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    live = labels != -100
    tok = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (tok * live).sum(-1) / live.sum(-1)
    plain = alpha_dpo_head(logps[:6], logps[6:], ref_c, ref_r, beta=2.5, gamma_beta_ratio=0.6, alpha=0.2,
                           margin_mean=torch.zeros(1), margin_std=torch.zeros(1)).losses.mean()
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    assert rel_err(fused.loss, plain) < 1e-5
    for g, r in zip(fused_grads, plain_grads):
        assert rel_err(g, r) < 1e-4


def _final_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "final", "model.safetensors"))


DEMO = ["--demo", "--max-steps", "20", "--eval-steps", "10", "--logging-steps", "5"]


def test_console_script_exits_zero(tmp_path):
    """The documented command, as a user types it (console script), succeeds with exit status 0."""
    import shutil as _sh

    exe = _sh.which("alphadpo-train")
    cmd = [exe] if exe else [sys.executable, "-m", "alphadpo_kernels.train"]
    proc = subprocess.run(cmd + ["--demo", "--max-steps", "4", "--eval-steps", "100", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval/rewards/accuracies" in proc.stdout and (tmp_path / "summary.json").exists()


def test_demo_learns_and_writes_its_files(tmp_path):
    summary = main(DEMO + ["--max-steps", "40", "--save-steps", "20", "--output-dir", str(tmp_path)])
    assert summary["eval/rewards/accuracies"] >= 0.9
    assert 0.3 < summary["eval/rewards/accuracies@start"] < 0.7
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_keys = {k for r in records for k in r if k.startswith("train/")}
    assert {"train/loss", "train/rewards/accuracies", "train/logps/ref_chosen", "train/margin_std"} <= train_keys
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40
    assert (tmp_path / "checkpoint-20" / "trainer_state.json").exists()
    assert not (tmp_path / "checkpoint-40").exists()  # the end writes the model only, unless --save-final-state


def test_the_nll_term_is_trained_and_logged(tmp_path):
    """--nll-weight adds the chosen responses' NLL (TRL's 'sft' term) from the same fused pass: logged as
    train/nll_loss, and the loss is the pair loss plus the weighted term."""
    main(DEMO + ["--max-steps", "2", "--eval-steps", "100", "--logging-steps", "1", "--nll-weight", "0.5",
                 "--output-dir", str(tmp_path / "nll")])
    main(DEMO + ["--max-steps", "2", "--eval-steps", "100", "--logging-steps", "1", "--output-dir",
                 str(tmp_path / "plain")])
    nll = [json.loads(x) for x in open(tmp_path / "nll" / "metrics.jsonl") if "train/loss" in x]
    plain = [json.loads(x) for x in open(tmp_path / "plain" / "metrics.jsonl") if "train/loss" in x]
    first, base = nll[0], plain[0]  # step 1: same weights, same batch
    assert first["train/nll_loss"] > 0
    assert abs(first["train/loss"] - (base["train/loss"] + 0.5 * first["train/nll_loss"])) < 1e-4 * first["train/loss"]


def test_resume_continues_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    main(DEMO + ["--save-steps", "10", "--save-total-limit", "3", "--output-dir", str(full)])
    part.mkdir()
    shutil.copytree(full / "checkpoint-10", part / "checkpoint-10")
    shutil.copytree(full / "reference_logps", part / "reference_logps")
    main(DEMO + ["--save-steps", "10", "--output-dir", str(part), "--resume", "latest"])
    a, b = _final_weights(full), _final_weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((part / "summary.json").read_text())["eval/rewards/accuracies"] == \
        json.loads((full / "summary.json").read_text())["eval/rewards/accuracies"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    """Two gloo processes with 8 pairs each follow the one-process run with 16 pairs (same global batch)."""
    steps = ["--max-steps", "6", "--eval-steps", "1000", "--save-steps", "1000", "--logging-steps", "1"]
    one = tmp_path / "one"
    main(["--demo", *steps, "--per-device-train-batch-size", "16", "--output-dir", str(one)])
    two = tmp_path / "two"
    # torchrun sets the environment that accelerate's Accelerator reads (gloo on the CPU); accelerate's own CLI
    # launches CPU-only multi-process runs through MPI, which this machine does not have.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "alphadpo_kernels.train", "--demo", *steps, "--per-device-train-batch-size", "8",
           "--output-dir", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_one = [json.loads(x) for x in open(one / "metrics.jsonl") if "train/loss" in x]
    log_two = [json.loads(x) for x in open(two / "metrics.jsonl") if "train/loss" in x]
    assert len(log_one) == len(log_two) == 6
    for r1, r2 in zip(log_one, log_two):
        for key in ("train/loss", "train/margin_mean", "train/margin_std", "train/rewards/margins"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), (r1["step"], key)
    a, b = _final_weights(one), _final_weights(two)
    for k in a:  # six Adam steps at lr 3e-3 amplify the reduction-order rounding a little
        assert rel_err(b[k], a[k]) < 2e-4, k


def test_online_reference_matches_precomputed(tmp_path):
    """--reference-mode online (reference model kept, one fused forward per step) logs what precompute does."""
    steps = ["--max-steps", "3", "--eval-steps", "1000", "--save-steps", "1000", "--logging-steps", "1"]
    main(["--demo", *steps, "--output-dir", str(tmp_path / "pre")])
    main(["--demo", *steps, "--reference-mode", "online", "--output-dir", str(tmp_path / "online")])
    pre = [json.loads(x) for x in open(tmp_path / "pre" / "metrics.jsonl") if "train/loss" in x]
    online = [json.loads(x) for x in open(tmp_path / "online" / "metrics.jsonl") if "train/loss" in x]
    assert not (tmp_path / "online" / "reference_logps").exists()
    for a, b in zip(pre, online):
        for key in ("train/loss", "train/logps/ref_chosen", "train/logps/ref_rejected", "train/margin_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_simpo_trains_without_a_reference(tmp_path):
    summary = main(["--demo", "--loss-type", "simpo", "--max-steps", "40", "--eval-steps", "1000",
                    "--output-dir", str(tmp_path)])
    assert summary["loss_type"] == "simpo" and summary["eval/rewards/accuracies"] >= 0.9
    assert "eval/logps/ref_chosen" not in summary and not (tmp_path / "reference_logps").exists()


def test_lean_memory_mode_trains_the_same_model(tmp_path):
    """--memory lean (two-pass backward, no float32 gradient buffer) logs what the default fast mode does."""
    steps = ["--max-steps", "3", "--eval-steps", "1000", "--save-steps", "1000", "--logging-steps", "1",
             "--mixed-precision", "no"]
    main(["--demo", *steps, "--output-dir", str(tmp_path / "fast")])
    main(["--demo", *steps, "--memory", "lean", "--output-dir", str(tmp_path / "lean")])
    fast = [json.loads(x) for x in open(tmp_path / "fast" / "metrics.jsonl") if "train/loss" in x]
    lean = [json.loads(x) for x in open(tmp_path / "lean" / "metrics.jsonl") if "train/loss" in x]
    assert len(fast) == len(lean) == 3
    for a, b in zip(fast, lean):
        for key in ("train/loss", "train/margin_std", "train/rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    with pytest.raises(ValueError, match="argument --memory: invalid choice: 'small'"):
        main(["--demo", "--memory", "small", "--output-dir", str(tmp_path / "bad")])
