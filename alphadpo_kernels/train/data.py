"""Preference data: load, apply the chat template, tokenize and truncate like the released trainer, collate.

Each example has ``prompt``, ``chosen`` and ``rejected``, either as strings (used verbatim) or, as in the
UltraFeedback-style sets of the released runs, ``chosen`` / ``rejected`` as chat-message lists whose last
message is the assistant's answer. Then, as the released scripts do, the prompt is the chat template of
the messages before the answer, and each response is the chat template of its answer message alone, so
the response carries the template's assistant header. A BOS is put in front of the prompt and an EOS after
each response when missing; when prompt + longer response exceed ``max_length``, the prompt keeps its last
``max_prompt_length`` tokens, and if that is still too long the responses keep their first
``max_length − max_prompt_length`` tokens. Prompt tokens are labelled ``-100``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100
TOKENIZED_FORMAT = 1  # bump when tokenization changes, so cached data sets are rebuilt


def _hub_name(path: str, default_split: str) -> tuple[str, str] | None:
    """``org/name`` or ``org/name:split`` when ``path`` is not a local file or folder."""
    if os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
        return None
    name, _, split = path.partition(":")
    return name, split or default_split


def _datasets(what: str):
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"{what} needs `pip install datasets`") from exc
    return datasets


def load_pairs(path: str, default_split: str = "train") -> list[dict]:
    """JSONL, JSON (a list, or an object with a ``data`` / ``train`` list), a ``datasets`` folder, or a hub data set
    ``org/name[:split]`` (the released runs: ``princeton-nlp/llama3-ultrafeedback``, splits train / test)."""
    hub = _hub_name(path, default_split)
    if hub is not None:
        datasets = _datasets(f"{path} names a hub data set: loading it")
        rows = [dict(r) for r in datasets.load_dataset(hub[0], split=hub[1])]
    elif os.path.isdir(path):
        datasets = _datasets(f"{path} is a folder: reading a datasets folder")
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        rows = [dict(r) for r in ds]
    elif path.endswith(".jsonl"):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path) as f:
            data = json.load(f)
        rows = data if isinstance(data, list) else data.get("data") or data.get("train")
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a list of examples or an object with a 'data' list")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: example {i} is a {type(r).__name__}, not an object with prompt, chosen, rejected")
        missing = {"chosen", "rejected"} - set(r)
        if missing:
            raise ValueError(f"{path}: example {i} lacks {sorted(missing)} (needs prompt, chosen, rejected)")
    return rows


def example_texts(example: dict, tokenizer) -> tuple[str, str, str]:
    chosen, rejected = example["chosen"], example["rejected"]
    if isinstance(chosen, str):
        if not isinstance(rejected, str) or not isinstance(example.get("prompt", ""), str):
            raise ValueError("prompt, chosen and rejected must all be strings or chat-message lists")
        return example.get("prompt", ""), chosen, rejected
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise ValueError("chosen and rejected must be strings or non-empty lists of chat messages")
    prompt_messages = chosen[:-1]
    if not prompt_messages:
        p = example.get("prompt")
        prompt_messages = p if isinstance(p, list) else [{"role": "user", "content": p or ""}]
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False)
    texts = []
    for msgs in (chosen, rejected):
        text = tokenizer.apply_chat_template(msgs[-1:], tokenize=False)
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]
        texts.append(text)
    if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
        prompt = prompt[len(tokenizer.bos_token):]
    return prompt, texts[0], texts[1]


def _answer_ids(tokenizer, prompt: str, answer: str, prompt_ids: list[int]) -> tuple[list[int], list[int]]:
    """Tokenize prompt + answer together and split where the prompt ends (merges across the boundary move
    the split one token left, as the released trainer does)."""
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if full[:start] != prompt_ids:
        start -= 1
    return full[:start], full[start:]


def tokenize_pair(example: dict, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    prompt, chosen, rejected = example_texts(example, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_prompt, c_ans = _answer_ids(tokenizer, prompt, chosen, prompt_ids)
    r_prompt, r_ans = _answer_ids(tokenizer, prompt, rejected, prompt_ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = {}
    answers = []
    for p_ids, a_ids in ((c_prompt, c_ans), (r_prompt, r_ans)):
        if bos is not None and (not p_ids or p_ids[0] != bos):
            p_ids = [bos] + p_ids
        if eos is not None and (not a_ids or a_ids[-1] != eos):
            a_ids = a_ids + [eos]
        answers.append([p_ids, a_ids])
    longer = max(len(answers[0][1]), len(answers[1][1]))
    for pa in answers:
        if len(pa[0]) + longer > max_length:
            pa[0] = pa[0][-max_prompt_length:]
    for pa in answers:
        if len(pa[0]) + longer > max_length:
            pa[1] = pa[1][: max_length - max_prompt_length]
    for key, (p_ids, a_ids) in zip(("chosen", "rejected"), answers):
        out[f"{key}_input_ids"] = p_ids + a_ids
        out[f"{key}_labels"] = [IGNORE] * len(p_ids) + a_ids
    return out


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs held as three flat arrays (memory-mapped when loaded from a cache): all token ids
    (``int32``), the offsets of the ``2n`` sequences (pair ``i``: chosen ``2i``, rejected ``2i + 1``) and each
    sequence's prompt length (its labels are ``-100`` there, the ids after)."""

    def __init__(self, rows: list[dict] | None, tokenizer=None, max_length: int = 0, max_prompt_length: int = 0, *,
                 arrays: dict[str, np.ndarray] | None = None):
        if arrays is None:
            arrays = _tokenize_rows(rows, tokenizer, max_length, max_prompt_length)
        self.tokens, self.offsets, self.prompt_lens = arrays["tokens"], arrays["offsets"], arrays["prompt_lens"]

    @classmethod
    def cached(cls, directory: str, build) -> "PreferenceDataset":
        """Load the arrays saved in ``directory`` (memory-mapped: every process shares the page cache), else
        ``build()`` a data set and save it there first. Run it on the main process first, then on the others."""
        names = ("tokens", "offsets", "prompt_lens")
        if all(os.path.exists(os.path.join(directory, f"{n}.npy")) for n in names):
            return cls(None, arrays={n: np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r") for n in names})
        ds = build()
        os.makedirs(directory, exist_ok=True)
        for n in names:
            tmp = os.path.join(directory, f"{n}.tmp.npy")
            np.save(tmp, getattr(ds, n))
            os.replace(tmp, os.path.join(directory, f"{n}.npy"))  # never a half-written cache
        return ds

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.tokens, self.offsets, self.prompt_lens):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:20]

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // 2

    def _sequence(self, j: int) -> tuple[list[int], list[int]]:
        ids = self.tokens[self.offsets[j]: self.offsets[j + 1]].tolist()
        p = int(self.prompt_lens[j])
        return ids, [IGNORE] * p + ids[p:]

    def __getitem__(self, i: int) -> dict:
        c_ids, c_lab = self._sequence(2 * i)
        r_ids, r_lab = self._sequence(2 * i + 1)
        return {"chosen_input_ids": c_ids, "chosen_labels": c_lab, "rejected_input_ids": r_ids,
                "rejected_labels": r_lab, "index": i}


def _tokenize_rows(rows: list[dict], tokenizer, max_length: int, max_prompt_length: int) -> dict[str, np.ndarray]:
    seqs, prompt_lens = [], []
    for r in rows:
        out = tokenize_pair(r, tokenizer, max_length, max_prompt_length)
        for key in ("chosen", "rejected"):
            ids, labels = out[f"{key}_input_ids"], out[f"{key}_labels"]
            seqs.append(ids)
            prompt_lens.append(next((k for k, lab in enumerate(labels) if lab != IGNORE), len(labels)))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return {"tokens": tokens, "offsets": offsets, "prompt_lens": np.asarray(prompt_lens, dtype=np.int32)}


def source_fingerprint(path: str) -> dict:
    """What identifies a data source without reading it: a file's size and modification time, a folder's files',
    or a hub data set's name and split."""
    if os.path.isfile(path):
        st = os.stat(path)
        return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs)
        return {"path": os.path.abspath(path),
                "files": [(os.path.relpath(f, path), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]}
    return {"hub": path}


def tokenizer_fingerprint(tokenizer) -> dict:
    return {"name": getattr(tokenizer, "name_or_path", ""), "size": len(tokenizer),
            "chat_template": tokenizer.chat_template, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "class": type(tokenizer).__name__}


@dataclass
class PreferenceCollator:
    """Chosen-first ``[2P, T]`` batches: rows ``0..P-1`` chosen, ``P..2P-1`` rejected, right-padded.

    With ``padding_free``, the 2P sequences are packed into one row in the same order: ``input_ids`` /
    ``labels`` / ``position_ids`` ``[1, N]`` (positions restart at 0 for each sequence, no attention mask: the
    decoder attends within each sequence), and ``cu_seqlens`` ``[2P + 1]`` for the fused loss.
    """

    pad_token_id: int
    padding_free: bool = False

    def __call__(self, items: list[dict]) -> dict:
        seqs = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
        labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
        index = torch.tensor([it["index"] for it in items])
        if self.padding_free:
            lengths = torch.tensor([len(q) for q in seqs])
            cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
            cu[1:] = lengths.cumsum(0)
            return {"input_ids": torch.tensor([t for q in seqs for t in q])[None],
                    "labels": torch.tensor([t for lab in labels for t in lab])[None],
                    "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
                    "cu_seqlens": cu, "index": index}
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        label_t = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            label_t[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "index": index}


class EpochSampler(torch.utils.data.Sampler):
    """A fixed permutation per (seed, epoch): the data order needs no RNG state to resume exactly."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())
