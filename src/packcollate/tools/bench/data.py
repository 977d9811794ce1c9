"""The examples a benchmark trains on: synthetic lengths, the shipped arithmetic problems, or a
tokenized .jsonl file / `datasets` directory."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...layout import IGNORE_INDEX, cumulative
from .config import BUILTIN_DATASETS, DISTRIBUTIONS


@dataclass
class Data:
    """The examples of one benchmark epoch.

    Attributes:
        name: dataset name as given (a built-in name or a path).
        examples: `n` dicts with `input_ids` (list of ints) and, when some tokens are not trained on,
            `labels` (-100 on them).
        pad_token_id: token id used for padding.
        vocab_size: smallest vocabulary the model needs.
        source: where the lengths come from.
    """

    name: str
    examples: list[dict]
    pad_token_id: int
    vocab_size: int
    source: str

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(e["input_ids"]) for e in self.examples), dtype=np.int64, count=len(self.examples))


def synthetic_lengths(name: str, n: int, rng: np.random.Generator, max_length: int | None = None) -> np.ndarray:
    """`(n,)` int64 lengths drawn from the distribution `name` of `DISTRIBUTIONS`."""
    spec = DISTRIBUTIONS[name]
    if spec["kind"] == "lognormal":
        lengths = rng.lognormal(math.log(spec["median"]), spec["sigma"], n)
    else:
        lengths = rng.integers(spec["min"], spec["max"] + 1, n)
    top = spec["max"] if max_length is None else min(spec["max"], max_length)
    return np.clip(np.round(lengths), spec["min"], top).astype(np.int64)


def _with_labels(prompt: list[int], completion: list[int]) -> dict:
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


def _load_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file, or of a `datasets` directory saved with `save_to_disk`."""
    if path.is_dir():
        try:
            import datasets
        except ImportError as error:
            raise ImportError(f"--dataset {path}: a directory is read with `datasets.load_from_disk`; "
                              "pip install datasets (or give a .jsonl file)") from error
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else next(iter(loaded))
            loaded = loaded[split]
        return loaded.to_list()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenize_rows(rows: Sequence[dict], tokenizer, text_field: str | None = None) -> list[dict]:
    """Tokenize rows with `text` (or `text_field`), `prompt` + `completion`, or `messages`.

    Returns dicts with `input_ids` and, for completion-only formats, `labels`.
    """
    if not rows:
        raise ValueError("dataset: expected at least one row, got none")
    keys = set(rows[0])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    if text_field or "text" in keys:
        name = text_field or "text"
        if name not in keys:
            raise KeyError(f"dataset: expected the field {name!r} in every row, got fields {sorted(keys)}")
        for row in rows:
            out.append({"input_ids": list(tokenizer(row[name])["input_ids"])})
    elif {"prompt", "completion"} <= keys:
        for row in rows:
            if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
                raise ValueError("dataset: expected `prompt` and `completion` strings, got "
                                 f"{type(row['prompt']).__name__} and {type(row['completion']).__name__}")
            prompt = list(tokenizer(row["prompt"])["input_ids"])
            completion = list(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) + eos
            out.append(_with_labels(prompt, completion))
    elif "messages" in keys:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("dataset: rows with `messages` need a tokenizer with a chat template; "
                             f"{type(tokenizer).__name__} has none")
        for row in rows:
            encoded = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
            ids = list(encoded["input_ids"])
            mask = encoded.get("assistant_masks")
            if mask is not None and any(mask):
                out.append({"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]})
            else:
                out.append({"input_ids": ids, "labels": list(ids)})
    else:
        raise KeyError(f"dataset: expected rows with `text`, `prompt` + `completion` or `messages` "
                       f"(or --text-field NAME), got fields {sorted(keys)}")
    if any("labels" in e for e in out):  # one schema for every example
        for e in out:
            e.setdefault("labels", list(e["input_ids"]))
    return out


def _truncate(examples: list[dict], max_length: int | None) -> list[dict]:
    if max_length is None:
        return examples
    return [{k: v[:max_length] for k, v in e.items()} for e in examples]


def _require_targets(examples: list[dict], dataset: str, rows: np.ndarray, max_length: int | None) -> None:
    """Every example keeps something to predict: 2 tokens or more and, with labels, a trained token
    after the first (a completion truncated away would make every mode's loss NaN)."""
    for i, example in enumerate(examples):
        where = f"--dataset {dataset}: row {int(rows[i])}"
        if len(example["input_ids"]) < 2:
            raise ValueError(f"{where} has fewer than 2 tokens; nothing to predict in it")
        if "labels" in example and not (np.asarray(example["labels"][1:]) != IGNORE_INDEX).any():
            cut = f" after --max-length {max_length}" if max_length else ""
            raise ValueError(f"{where} keeps no trained token{cut} (its completion is empty or was truncated away)")


def load_data(
    dataset: str,
    n_examples: int,
    *,
    vocab_size: int,
    seed: int = 0,
    tokenizer: str | None = None,
    text_field: str | None = None,
    max_length: int | None = None,
) -> Data:
    """`n_examples` examples of `dataset` (a built-in name, a .jsonl file or a `datasets` directory)."""
    rng = np.random.default_rng(seed)
    if dataset in DISTRIBUTIONS:
        lengths = synthetic_lengths(dataset, n_examples, rng, max_length)
        ids = rng.integers(0, vocab_size, int(lengths.sum())).tolist()
        bounds = cumulative(lengths).tolist()
        examples = [{"input_ids": ids[bounds[i]:bounds[i + 1]]} for i in range(n_examples)]
        spec = {k: v for k, v in DISTRIBUTIONS[dataset].items() if k != "source"}
        return Data(dataset, examples, 0, vocab_size, f"{DISTRIBUTIONS[dataset]['source']}; {spec}")
    if dataset == "arithmetic":
        from ..toy import char_tokenizer, load_arithmetic, tokenize_prompt_completion

        problems = load_arithmetic()
        if n_examples > len(problems):
            raise ValueError(f"--dataset arithmetic: expected at most {len(problems)} examples "
                             f"(steps x batch size), got {n_examples}")
        chosen = rng.permutation(len(problems))[:n_examples]
        tok = char_tokenizer()
        tokenized = tokenize_prompt_completion([problems[i] for i in chosen], tok)
        examples = [{"input_ids": e["input_ids"],
                     "labels": [t if m else IGNORE_INDEX for t, m in zip(e["input_ids"], e["completion_mask"])]}
                    for e in tokenized]
        examples = _truncate(examples, max_length)
        _require_targets(examples, dataset, chosen, max_length)
        return Data(dataset, examples, tok.pad_token_id, len(tok),
                    "the shipped arithmetic word problems (packcollate.tools.toy), character tokenizer, completion-only")
    path = Path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"--dataset: expected one of {BUILTIN_DATASETS}, a .jsonl file or a `datasets` "
                                f"directory, got {dataset!r} (no such file)")
    if tokenizer is None:
        raise ValueError(f"--dataset {dataset}: a file of text needs --tokenizer DIR (a local tokenizer directory)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True, trust_remote_code=False)
    rows = _load_rows(path)
    if n_examples > len(rows):
        raise ValueError(f"--dataset {dataset}: expected at least {n_examples} rows (steps x batch size), "
                         f"got {len(rows)}")
    chosen = rng.permutation(len(rows))[:n_examples]
    examples = _truncate(tokenize_rows([rows[i] for i in chosen], tok, text_field), max_length)
    _require_targets(examples, dataset, chosen, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return Data(dataset, examples, int(pad), len(tok), f"{dataset} tokenized with {tokenizer}")
