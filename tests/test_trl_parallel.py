"""``AlphaDPOTrainer`` with accelerate's ``ParallelismConfig``: context parallel (cp=2, with and without precomputed
reference log-probs), tensor parallel (tp=2, the LM head sharded on an odd vocabulary by the model's ``tp_plan``)
and 2 data-parallel × 2 context-parallel ranks, each on CPU processes (gloo) against one plain process on the
same global batches: every logged training and evaluation metric (losses, rewards, log-probs, α-DPO's margin
statistics, token counts, gradient norms) and the final weights. See tests/trl_parallel_worker.py for what
stands in for GPU-only parts (ring attention).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
WORKER = os.path.join(ROOT, "tests", "trl_parallel_worker.py")


def train_rows() -> list[dict]:
    from test_trl import _rows

    return _rows()[:12]  # 3 steps of 4 pairs


def eval_rows(n: int = 4) -> list[dict]:
    from test_trl import _rows

    return _rows()[16 - n:]


def datasets_in(folder, eval_size: int = 4) -> dict:
    """The train and eval sets saved to ``folder`` and loaded back: their caches (TRL's precomputed reference
    log-probs among them) then live in a folder every process sees, not in a per-process temporary one."""
    from datasets import Dataset, load_from_disk

    out = {}
    for name, rows in (("train", train_rows()), ("eval", eval_rows(eval_size))):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            Dataset.from_list(rows).save_to_disk(path)
        out[f"{name}_dataset"] = load_from_disk(path)
    return out


def config_kwargs(out, **overrides) -> dict:
    return {**dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=3,
                   learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", seed=0, use_cpu=True,
                   bf16=False, disable_tqdm=True, eval_strategy="steps", eval_steps=2, kernel_backend="torch"),
            **overrides}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("trl")
    from test_trl import _save_model

    # an odd vocabulary (the tokenizer's 20 ids and one more row): tensor-parallel head shards of 11 and 10 rows
    return _save_model(tmp_path_factory.mktemp("tiny_llama"), vocab_size=21)


def _one_process(model_dir, out, eval_size, **spec) -> tuple[list[dict], dict, list | None]:
    from alphadpo_kernels.integrations.trl import AlphaDPOConfig, AlphaDPOTrainer

    trainer = AlphaDPOTrainer(model=model_dir, args=AlphaDPOConfig(**config_kwargs(out, **spec)),
                              **datasets_in(out / "data", eval_size))
    trainer.train()
    loss = trainer.alphadpo_loss
    margin = [float(loss.margin_mean), float(loss.margin_std)] if loss.loss_type == "alpha_dpo" else None
    return trainer.state.log_history, trainer.model.state_dict(), margin


def _launch(model_dir, out, procs: int, spec: dict) -> subprocess.CompletedProcess:
    from helpers import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
           str(free_port()), WORKER, model_dir, str(out), json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def _assert_same_history(a: list[dict], b: list[dict], eval_keys=None) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    compared = 0
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            # total_flos: transformers counts every process's tokens, so cp ranks add up the padded shares
            if (key in ("step", "epoch", "total_flos") or not isinstance(va, float)
                    or key.endswith(("runtime", "per_second"))):
                continue
            if eval_keys is not None and key.startswith("eval_") and key not in eval_keys:
                continue
            prefix = key[: -len("rewards/accuracies")]
            if key.endswith("rewards/accuracies") and max(abs(ra[prefix + "rewards/chosen"]),
                                                          abs(ra[prefix + "rewards/rejected"])) < 1e-5:
                continue  # DPO's first step: policy = reference, chosen > rejected is a comparison of roundings
            # float32 sums in another order; α-DPO divides by a margin std of ~1e-3, which magnifies them
            assert math.isclose(rb[key], va, rel_tol=2e-4, abs_tol=1e-6), (ra.get("step"), key, va, rb[key])
            compared += 1
    assert compared > 30


RUNS = {
    # the pair loss and TRL's "sft" term; evaluation sharded too
    "cp2": (2, dict(sizes=dict(cp_size=2), loss_type=["alpha_dpo", "sft"], loss_weights=[1.0, 0.5])),
    # reference log-probs precomputed over sharded batches, gathered over the data-parallel ranks only
    "cp2-precomputed": (2, dict(sizes=dict(cp_size=2), loss_type="sigmoid", precompute_ref_log_probs=True)),
    # the model's tp_plan: the LM head a DTensor Shard(0) on a 21-row vocabulary (uneven shards)
    "tp2": (2, dict(sizes=dict(tp_size=2))),
    # 6 evaluation pairs over 2 data-parallel ranks of 2: the last evaluation batch is padded by accelerate and cut
    # back by the gather; TRL's own eval metrics average per-batch means, padding included, so only eval_loss is
    # the same number as one process's
    "dp2-cp2": (4, dict(sizes=dict(dp_shard_size=2, cp_size=2), per_device_train_batch_size=2,
                        per_device_eval_batch_size=2, eval_size=6)),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_parallel_run_equals_one_process(model_dir, tmp_path, name):
    procs, spec = RUNS[name]
    eval_size = spec.get("eval_size", 4)
    reference_spec = {k: v for k, v in spec.items() if k not in ("sizes", "per_device_train_batch_size",
                                                                  "per_device_eval_batch_size", "eval_size")}
    history, weights, margin = _one_process(model_dir, tmp_path / "one", eval_size, **reference_spec)
    datasets_in(tmp_path / "data", eval_size)  # saved once, before the processes start
    proc = _launch(model_dir, tmp_path, procs, spec)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(procs)]
    cp, tp = spec["sizes"].get("cp_size", 1), spec["sizes"].get("tp_size", 1)
    assert all((r["sharded_attention_calls"] > 0) == (cp > 1) for r in ranks)  # the sequences were split
    assert [r["head_rows"] for r in ranks] == ([11, 10] if tp == 2 else [21] * procs)
    for r in ranks:
        _assert_same_history(history, r["history"], eval_keys=("eval_loss",) if eval_size % 4 else None)
        if margin is not None:  # α-DPO: the same statistics on every rank, counted once per pair
            assert r["margin"] == ranks[0]["margin"]
            assert r["margin"] == pytest.approx(margin, rel=1e-4)
    assert any("eval_loss" in h for h in history)
    parallel = torch.load(tmp_path / "weights.pt")
    assert parallel.keys() == weights.keys()
    moved = 0
    for key, w in weights.items():
        torch.testing.assert_close(parallel[key], w, rtol=1e-5, atol=1e-5, msg=key)
        moved += 1
    assert moved > 5


def test_what_is_not_supported_is_refused_by_name(model_dir, tmp_path):
    """Under cp, eager attention would attend within each rank's share of the sequence only, and a batch could
    be trained on misaligned labels: refused by name, on every rank, before any work (one launch, six cases)."""
    from test_trl import _save_model
    from transformers import MistralConfig

    datasets_in(tmp_path / "data")
    windowed = _save_model(tmp_path / "mistral", config_cls=MistralConfig, sliding_window=4)
    cases = [dict(sizes=dict(cp_size=2), attn="eager"), dict(sizes=dict(cp_size=2), lora=True),
             dict(sizes=dict(tp_size=2), lora=True),
             dict(sizes=dict(cp_size=2), accelerator_config={"dispatch_batches": True}),
             dict(sizes=dict(cp_size=2), model=windowed),
             dict(sizes=dict(cp_size=2), compute_metrics=True)]
    proc = _launch(model_dir, tmp_path, 2, dict(refusals=cases))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    for r in range(2):
        attention, lora_cp, lora_tp, dispatch, window, metrics = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert "parallelism_config cp_size=2 needs attn_implementation sdpa" in attention
        assert "does not take PEFT adapters together with context / tensor parallelism" in lora_cp
        assert "does not take PEFT adapters" in lora_tp and "tp_size=2" in lora_tp
        assert "dispatch_batches" in dispatch
        assert "does not support context parallelism (sliding-window" in window
        assert "compute_metrics / prediction_loss_only=False under context parallelism" in metrics
