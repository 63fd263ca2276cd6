"""Builds the embedded demo's tokenizer and data (deterministic; the outputs are shipped in demo_assets/).

    python -m alphadpo_kernels.train.make_demo_assets

The task: the user asks to sort a few digits; the chosen answer is sorted, the rejected one is an unsorted
permutation of the same digits. Both answers have the same tokens and length, so a fresh model prefers
either at chance, and the rule (each digit ≥ the one before) is one a small model learns in minutes.
"""

from __future__ import annotations

import json
import os
import random

ASSETS = os.path.join(os.path.dirname(__file__), "demo_assets")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["sort", "these", ":"] + [str(d) for d in range(10)]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(path: str = os.path.join(ASSETS, "tokenizer")):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def make_pair(rng: random.Random) -> dict:
    # Distinct digits: with repeats, equal digits sit side by side only in the sorted answer, a cue that an
    # untrained model can pick up before learning anything.
    digits = rng.sample(range(10), rng.randint(4, 7))
    ordered = sorted(digits)
    shuffled = digits[:]
    rng.shuffle(shuffled)
    while shuffled == ordered:
        rng.shuffle(shuffled)
    prompt = "sort these : " + " ".join(map(str, digits))
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": " ".join(map(str, ordered))}],
        "rejected": [user, {"role": "assistant", "content": " ".join(map(str, shuffled))}],
    }


def build_data(n_train: int = 2048, n_eval: int = 256, seed: int = 1234) -> None:
    rng = random.Random(seed)
    for name, n in (("train", n_train), ("eval", n_eval)):
        with open(os.path.join(ASSETS, f"sort_{name}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps(make_pair(rng)) + "\n")


if __name__ == "__main__":
    os.makedirs(ASSETS, exist_ok=True)
    build_tokenizer()
    build_data()
    print(f"wrote {ASSETS}")
