"""The embedded demo: a tiny Llama built from a config, the shipped word-level tokenizer, and the shipped
"sort the digits" preference task (see make_demo_assets.py). Runs on one CPU in seconds (about 7 s on a
2-core machine)."""

from __future__ import annotations

import os

import torch

ASSETS = os.path.join(os.path.dirname(__file__), "demo_assets")


def demo_overrides() -> dict:
    return dict(
        demo=True,
        train_file=os.path.join(ASSETS, "sort_train.jsonl"),
        eval_file=os.path.join(ASSETS, "sort_eval.jsonl"),
        tokenizer_name_or_path=os.path.join(ASSETS, "tokenizer"),
        output_dir="alphadpo-demo",
        max_length=48,
        max_prompt_length=24,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=128,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        warmup_ratio=0.1,
        max_steps=120,
        mixed_precision="no",
        gradient_checkpointing=False,
        logging_steps=10,
        eval_steps=40,
        save_steps=60,
    )


def build_demo_model(vocab_size: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
