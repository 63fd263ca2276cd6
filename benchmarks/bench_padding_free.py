"""Padded vs padding-free (packed) training steps of alphadpo-train on the embedded demo: decoder tokens per step
and wall time per step, the same model and data otherwise.

    python benchmarks/bench_padding_free.py [--steps 40] [--json out.json]

The decoder tokens are counted from the trainer's own collator over the training order; the time is the
trainer's (`summary.json` seconds, which include evaluation at start and end) divided by the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def decoder_tokens(padding_free: bool, steps: int, batch: int) -> int:
    """Tokens the decoder processes over the first ``steps`` training batches (padded: rows × widest row)."""
    from transformers import AutoTokenizer

    from alphadpo_kernels.train.data import EpochSampler, PreferenceCollator, PreferenceDataset, load_pairs
    from alphadpo_kernels.train.demo import ASSETS, demo_overrides

    cfg = demo_overrides()
    tok = AutoTokenizer.from_pretrained(cfg["tokenizer_name_or_path"])
    ds = PreferenceDataset(load_pairs(cfg["train_file"]), tok, cfg["max_length"], cfg["max_prompt_length"])
    order = list(EpochSampler(len(ds), 42))
    collate = PreferenceCollator(tok.pad_token_id, padding_free=padding_free)
    total = 0
    for s in range(steps):
        b = collate([ds[i] for i in order[s * batch:(s + 1) * batch]])
        total += b["input_ids"].numel()
    assert ASSETS
    return total


def main(argv=None) -> dict:
    from alphadpo_kernels.train.trainer import main as train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--json")
    args = p.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in (("padded", []), ("packed", ["--padding-free", "true"])):
            summary = train(["--demo", "--max-steps", str(args.steps), "--eval-steps", "100000", "--save-steps",
                             "100000", "--output-dir", os.path.join(tmp, name), *flags])
            out[name] = {"seconds_per_step": summary["seconds"] / args.steps,
                         "decoder_tokens_per_step": decoder_tokens(name == "packed", args.steps, 16) / args.steps,
                         "eval_accuracy": summary["eval/rewards/accuracies"]}
    for name, r in out.items():
        print(f"{name:7s} {r['decoder_tokens_per_step']:8.1f} decoder tokens/step  {1e3 * r['seconds_per_step']:7.1f} "
              f"ms/step  held-out accuracy {r['eval_accuracy']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
