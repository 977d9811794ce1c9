"""`packcollate bench`: training throughput and peak memory, padded vs padding-free, side by side.

    packcollate bench                                   # CPU: tiny Llama, FLAN-like lengths, fp32
    packcollate bench --preset llama-1b --dataset orcamath --batch-size 8    # GPU, bf16
    packcollate bench --preset ./my-model --dataset data.jsonl --tokenizer ./my-model

Real training steps (forward, backward, AdamW) of a model built from a config (random weights unless
`--load-weights`; nothing is downloaded), on the same examples in every mode:

| mode | batches | collator | attention |
| --- | --- | --- | --- |
| `padded` | `--batch-size` examples in dataset order | `PaddedCollator` (right padding) | sdpa |
| `padded-grouped` | the same examples, sorted by length inside mega-batches, then batched (HF `group_by_length`) | `PaddedCollator` | sdpa |
| `hf-flatten` | as `padded` | transformers' `DataCollatorWithFlattening` | sdpa (flash_attention_2 on CUDA when installed), `use_cache=False` |
| `packcollate` | as `padded` | `PackedCollator` | `packcollate` |
| `packcollate-budget` | `TokenBudgetBatchSampler(max_tokens)` | `PackedCollator` | `packcollate` |
| `trl-bfd` | rows of TRL's `pack_dataset(strategy="bfd", seq_length=max_tokens)`, one row a step | `PackedCollator` (reads `seq_lengths`) | `packcollate` |

`max_tokens` is the mean number of real tokens of a fixed batch (`--max-tokens` overrides), so a
budget step does the same work as a packed fixed step, with every step close to that size.
`trl-bfd` needs TRL and `datasets`; it is skipped with a note when they are missing.

What is measured, per mode:
- real (non-pad) tokens/s: every batch of the epoch is timed `--repeats` times after `--warmup`
  untimed steps; tokens/s = real tokens of the epoch / sum over batches of each batch's median
  time (with `--repeats 1`, the epoch's tokens over its time). Modes with other batch compositions
  (grouped, budget, bfd) process the same examples, so this is a like-for-like rate. Collation is
  done once before timing and reported apart (`collate_s_per_step`).
- interleaving: on CPU every mode has its own copy of the model and the modes take turns step by
  step, each at the same fraction of its epoch, so machine noise hits them alike. On CUDA the modes
  run one after the other on one model reloaded with the initial weights: a 1B model with its
  AdamW state takes ~10 GB, several copies would distort each other's peak memory, and a dedicated
  GPU's step time is steady after warm-up (`--interleave` overrides).
- peak memory: CUDA: `torch.cuda.max_memory_allocated()`, reset before each mode's warm-up, with
  only that mode's model resident: weights + gradients + AdamW state + activations. CPU: each mode
  trains on its largest batches (`--memory-steps`, default 2: the two batches that compute the most
  tokens, the largest last) in a forked child process (one thread) that resets
  the kernel's peak-RSS counter (`/proc/self/clear_refs`), copies the initial model and trains; the
  figure is the child's peak resident memory (`VmHWM`) less file-backed pages (library code) over
  its anonymous memory before the copy: weights + gradients + AdamW state + activations + allocator
  overhead. A fresh fork per mode: every mode starts from the same process state and no mode's
  freed memory hides another's peak. Linux only; elsewhere memory is not measured.
- padded-token fraction, and the ideal speed-up: padded tokens / real tokens.
- loss: the first step's loss (initial weights) must agree between modes that see the same batches
  (`padded`, `hf-flatten`, `packcollate`); and, for every mode, the token-mean loss over the whole
  epoch of examples at the initial weights (evaluated, no optimizer step, in fp32) must agree to
  1e-4 whatever the batch composition: no mode may let examples see each other.

Length distributions (synthetic token ids; the parameters are modelled, not measured):
- `flan`: lognormal, median 120 tokens, sigma 0.9, clipped to [8, 1024]. Modelled on FLAN-v2
  instruction mixtures as used by the IBM / Hugging Face packing study (arXiv 2407.09105, a FLAN
  subset): mostly short prompts and answers with a heavy tail of long ones. Per-example lengths
  were not published; these parameters reproduce that shape (mean ~180, p99 ~1000).
- `orcamath`: lognormal, median 260 tokens, sigma 0.45, clipped to [32, 2048]. Modelled on
  microsoft/orca-math-word-problems-200k: its dataset card gives 200,035 examples in 225,322,861
  bytes, ~1,130 characters of question + worked answer each, ~280 Llama tokens at ~4 characters a
  token; answers of one generator in one style, hence a narrow spread.
- `uniform`: uniform integers in [32, 512].
- `arithmetic`: the shipped word problems (`packcollate.toy`), character tokenizer, completion-only.
- a `.jsonl` file or a `datasets` directory (`save_to_disk`) with `--tokenizer DIR`: rows with a
  `text` field (every token trained), `prompt` + `completion` (completion-only), or `messages`
  (the tokenizer's chat template; assistant-only loss when the template marks generation).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attention import BACKEND_NAME, describe
from .collate import PackedCollator, PaddedCollator
from .masking import IGNORE_INDEX
from .sampler import TokenBudgetBatchSampler

logger = logging.getLogger("packcollate")

MODES = ("padded", "padded-grouped", "hf-flatten", "packcollate", "packcollate-budget", "trl-bfd")
#: Modes whose batches hold exactly the examples of `padded`'s batches: their first losses must agree.
SAME_BATCHES = ("padded", "hf-flatten", "packcollate")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Model presets: Llama-shaped configs (random weights).
PRESETS = {
    # for tests: a few hundred thousand parameters
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
    # CPU: 5.2 M parameters, grouped-query attention 8/2. The vocabulary is sized so that the LM head
    # does about the share of a step's matrix work it does in Llama-3.2-1B (~25% here, ~21% there):
    # a larger one would make the CPU step a memory-bound logits benchmark.
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096),
    # GPU: Llama-3.2-1B's shape (1.24 B parameters, tied embeddings, rope theta 500k)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}

#: Synthetic length distributions (see the module docstring for their source).
DISTRIBUTIONS = {
    "flan": {"kind": "lognormal", "median": 120, "sigma": 0.9, "min": 8, "max": 1024,
             "source": "modelled on FLAN-v2 instruction data (IBM/HF packing study, arXiv 2407.09105): "
                       "short, very uneven; not measured"},
    "orcamath": {"kind": "lognormal", "median": 260, "sigma": 0.45, "min": 32, "max": 2048,
                 "source": "modelled on microsoft/orca-math-word-problems-200k (~1,130 characters a row "
                           "per its dataset card, ~280 Llama tokens): longer, more even; not measured"},
    "uniform": {"kind": "uniform", "min": 32, "max": 512, "source": "uniform integers"},
}
BUILTIN_DATASETS = (*DISTRIBUTIONS, "arithmetic")

#: Targets the published numbers are checked against: (device type, preset, dataset) -> mode -> (speed-up >=, memory <=).
TARGETS = {
    ("cpu", "tiny", "flan"): {"packcollate": (2.5, None), "packcollate-budget": (2.5, None)},
    ("cuda", "llama-1b", "flan"): {"packcollate": (2.0, 0.8)},
    ("cuda", "llama-1b", "orcamath"): {"packcollate": (1.4, 0.95)},
}

#: Median relative spread between repeats of a batch above which the timings are reported as noisy.
NOISY_SPREAD = 0.15

EPOCH_LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
STEP_LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


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
        bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        examples = [{"input_ids": ids[bounds[i]:bounds[i + 1]]} for i in range(n_examples)]
        spec = {k: v for k, v in DISTRIBUTIONS[dataset].items() if k != "source"}
        return Data(dataset, examples, 0, vocab_size, f"{DISTRIBUTIONS[dataset]['source']}; {spec}")
    if dataset == "arithmetic":
        from .toy import char_tokenizer, load_arithmetic, tokenize_prompt_completion

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
        return Data(dataset, _truncate(examples, max_length), tok.pad_token_id, len(tok),
                    "the shipped arithmetic word problems (packcollate.toy), character tokenizer, completion-only")
    path = Path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"--dataset: expected one of {BUILTIN_DATASETS}, a .jsonl file or a `datasets` "
                                f"directory, got {dataset!r} (no such file)")
    if tokenizer is None:
        raise ValueError(f"--dataset {dataset}: a file of text needs --tokenizer DIR (a local tokenizer directory)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    rows = _load_rows(path)
    if n_examples > len(rows):
        raise ValueError(f"--dataset {dataset}: expected at least {n_examples} rows (steps x batch size), "
                         f"got {len(rows)}")
    chosen = rng.permutation(len(rows))[:n_examples]
    examples = _truncate(tokenize_rows([rows[i] for i in chosen], tok, text_field), max_length)
    short = [i for i, e in enumerate(examples) if len(e["input_ids"]) < 2]
    if short:
        raise ValueError(f"--dataset {dataset}: row {int(chosen[short[0]])} has fewer than 2 tokens; "
                         "nothing to predict in it")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return Data(dataset, examples, int(pad), len(tok), f"{dataset} tokenized with {tokenizer}")


# ---------------------------------------------------------------------------------------------
# Batches of each mode
# ---------------------------------------------------------------------------------------------


def fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    """Batches of `batch_size` consecutive indices (the last one may be shorter)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: np.ndarray, batch_size: int, mega_batch_mult: int | None = None) -> list[list[int]]:
    """transformers' `group_by_length` without its shuffle: indices in dataset order are cut into
    mega-batches of `mega_batch_mult * batch_size` (default `min(n // (4 * batch_size), 50)`, at
    least 1), each sorted by length (longest first) and cut into batches; the batch holding the
    longest example goes first (so an out-of-memory error shows at once)."""
    n = len(lengths)
    if mega_batch_mult is None:
        mega_batch_mult = max(min(n // (batch_size * 4), 50), 1)
    mega = mega_batch_mult * batch_size
    order = []
    for start in range(0, n, mega):
        chunk = np.arange(start, min(start + mega, n))
        order.extend(chunk[np.argsort(-lengths[chunk], kind="stable")].tolist())
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


@dataclass
class ModeRun:
    """One mode's batches, ready to train on, and what was measured."""

    name: str
    attn_implementation: str
    collator_name: str
    batches: list[dict]  # collated, on the device
    real_tokens: list[int]  # per batch
    computed_tokens: list[int]  # per batch
    examples: int
    collate_seconds: float
    note: str = ""
    times: list[list[float]] = field(default_factory=list)  # per batch, one per repeat
    losses: list[float] = field(default_factory=list)  # every step in order, warm-up included
    peak_mem_bytes: int | None = None
    epoch_loss: float | None = None


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=False) if torch.is_tensor(v) else v for k, v in batch.items()}


def _hf_attention(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            from transformers.utils import is_flash_attn_2_available
        except ImportError:  # pragma: no cover
            return "sdpa"
        return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    return "sdpa"


def _trl_bfd_rows(examples: list[dict], seq_length: int) -> list[dict]:
    """Rows of TRL's `pack_dataset(strategy="bfd")`: each `{input_ids, [labels], seq_lengths}`."""
    import datasets
    from trl.data_utils import pack_dataset

    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        packed = pack_dataset(datasets.Dataset.from_list(examples), seq_length, strategy="bfd")
        return packed.to_list()
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def build_modes(
    data: Data,
    modes: Sequence[str],
    batch_size: int,
    device: torch.device,
    *,
    max_tokens: int | None = None,
    hf_attn: str = "auto",
    seed: int = 0,
) -> tuple[dict[str, ModeRun], int, list[str]]:
    """Collate every mode's batches (on `device`). Returns the runs, `max_tokens` and notes on skipped modes."""
    from transformers import DataCollatorWithFlattening

    examples, lengths = data.examples, data.lengths
    fixed = fixed_batches(len(examples), batch_size)
    mean_real = int(math.ceil(np.mean([lengths[b].sum() for b in fixed])))
    if max_tokens is None:  # the same real tokens per step as the fixed batches: same work, balanced steps
        max_tokens = max(mean_real, int(lengths.max()))
    elif max_tokens < int(lengths.max()):
        raise ValueError(f"--max-tokens: expected at least the longest example ({int(lengths.max())} tokens), "
                         f"got {max_tokens}")
    packed = PackedCollator()
    padded = PaddedCollator.like(packed, pad_token_id=data.pad_token_id)
    notes = []
    plans: dict[str, tuple[list[list[dict]], object, str, str]] = {}
    for mode in modes:
        if mode == "padded":
            plans[mode] = ([[examples[i] for i in b] for b in fixed], padded, "sdpa", "")
        elif mode == "padded-grouped":
            grouped = length_grouped_batches(lengths, batch_size)
            plans[mode] = ([[examples[i] for i in b] for b in grouped], padded, "sdpa",
                           "length-grouped mega-batches (transformers' group_by_length, no shuffle)")
        elif mode == "hf-flatten":
            plans[mode] = ([[examples[i] for i in b] for b in fixed], DataCollatorWithFlattening(),
                           _hf_attention(hf_attn, device), "use_cache=False")
        elif mode == "packcollate":
            plans[mode] = ([[examples[i] for i in b] for b in fixed], packed, BACKEND_NAME, "")
        elif mode == "packcollate-budget":
            sampler = TokenBudgetBatchSampler(lengths, max_tokens, seed=seed, num_replicas=1, rank=0)
            plans[mode] = ([[examples[i] for i in b] for b in sampler], packed, BACKEND_NAME,
                           f"TokenBudgetBatchSampler(max_tokens={max_tokens})")
        elif mode == "trl-bfd":
            try:
                rows = _trl_bfd_rows(examples, max_tokens)
            except ImportError as error:
                notes.append(f"trl-bfd skipped: needs TRL and datasets ({error})")
                continue
            kept = sum(len(r["input_ids"]) for r in rows)
            note = f"trl.data_utils.pack_dataset(seq_length={max_tokens}, strategy='bfd'), one row a step"
            if kept != int(lengths.sum()):
                note += f"; TRL kept {kept} of {int(lengths.sum())} tokens"
            plans[mode] = ([[r] for r in rows], packed, BACKEND_NAME, note)
        else:
            raise ValueError(f"modes: expected names from {MODES}, got {mode!r}")

    runs = {}
    for mode, (feature_batches, collator, attn, note) in plans.items():
        start = time.perf_counter()
        collated = [collator(b) for b in feature_batches]
        seconds = time.perf_counter() - start
        runs[mode] = ModeRun(
            name=mode,
            attn_implementation=attn,
            collator_name=type(collator).__name__,
            batches=[_to_device(b, device) for b in collated],
            real_tokens=[sum(len(f["input_ids"]) for f in b) for b in feature_batches],
            computed_tokens=[int(b["input_ids"].numel()) for b in collated],
            examples=sum(len(b) if "seq_lengths" not in b[0] else sum(len(f["seq_lengths"]) for f in b)
                         for b in feature_batches),
            collate_seconds=seconds,
            note=note,
        )
    return runs, max_tokens, notes


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_model(preset: str, vocab_size: int, dtype: torch.dtype, device: torch.device, *,
                load_weights: bool = False, seed: int = 0):
    """A causal LM from a preset name or a local model directory (config only unless `load_weights`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if preset in PRESETS:
        if load_weights:
            raise ValueError(f"--load-weights: expected a local model directory, got the preset {preset!r}")
        params = dict(PRESETS[preset])
        params["vocab_size"] = max(params["vocab_size"], vocab_size)
        config = LlamaConfig(**params, use_cache=False)
    elif Path(preset).is_dir():
        if load_weights:
            model = AutoModelForCausalLM.from_pretrained(preset, local_files_only=True, dtype=dtype,
                                                         attn_implementation="sdpa")
            return model.to(device)
        config = AutoConfig.from_pretrained(preset, local_files_only=True)
        if getattr(config, "vocab_size", vocab_size) < vocab_size:
            raise ValueError(f"--preset {preset}: its vocabulary ({config.vocab_size}) is smaller than the "
                             f"data's tokenizer ({vocab_size})")
    else:
        raise ValueError(f"--preset: expected one of {tuple(PRESETS)} or a local model directory, got {preset!r}")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, batch: dict, device: torch.device) -> tuple[float, float]:
    """One forward + backward + AdamW step; returns (loss, seconds)."""
    _sync(device)
    start = time.perf_counter()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    return float(loss.detach()), seconds


def _optimizer(model, lr: float):
    return torch.optim.AdamW(model.parameters(), lr=lr)


def _warmup_batches(run: ModeRun, warmup: int) -> list[dict]:
    return [run.batches[i % len(run.batches)] for i in range(warmup)]


def epoch_loss(model, batches: Sequence[dict]) -> float:
    """Token-mean loss over every target token of `batches` (no gradient, no optimizer step)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            targets = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
            if targets == 0:
                continue
            loss = model(**batch, use_cache=False).loss
            total += float(loss.double()) * targets
            count += targets
    return total / max(count, 1)


def _proc_status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`), so that reusing them counts."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fork_memory_available() -> bool:
    """Peak RSS per mode needs `os.fork` and a resettable peak counter (`/proc/self/clear_refs`, Linux)."""
    return hasattr(os, "fork") and os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


def peak_rss_in_child(fn) -> int:
    """Run `fn()` in a forked child (one thread); return its peak anonymous-memory increase in bytes.

    The child resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), returns free
    heap pages to the OS, notes its anonymous RSS (`RssAnon`), runs `fn`, and reports
    `VmHWM - RssFile - RssShmem - RssAnon_before`: the peak of resident memory less the file-backed
    pages (shared-library code mapped in as the child runs, which a forked child faults in again
    whatever the mode), over the anonymous memory it started with. A fork starts from the parent's
    exact state, so every mode starts from the same memory, and nothing a mode allocates can hide
    another's peak. Assumes no file-backed page is dropped while `fn` runs (a machine not short of memory).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 0
        try:
            os.close(read_end)
            torch.set_num_threads(1)  # OpenMP's pool does not survive fork; as DataLoader workers do
            gc.collect()
            _release_free_heap()
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            before = _proc_status("RssAnon:")
            fn()
            # VmHWM counts file-backed pages too (library code the child maps in as it runs, the same
            # for every mode): take out those still mapped at the end to keep anonymous memory only
            peak = _proc_status("VmHWM:") - _proc_status("RssFile:") - _proc_status("RssShmem:")
            message = json.dumps({"peak": peak - before})
        except BaseException as error:  # report, never fall through into the parent's code
            message = json.dumps({"error": f"{type(error).__name__}: {error}"})
            status = 1
        os.write(write_end, message.encode())
        os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    reply = json.loads(b"".join(chunks) or b'{"error": "the child died without a reply"}')
    if "error" in reply:
        raise RuntimeError(f"memory measurement in a forked child failed: {reply['error']}")
    return int(reply["peak"])


def memory_batches(run: ModeRun, memory_steps: int | None, warmup: int) -> list[dict]:
    """The batches a memory measurement trains on.

    `memory_steps=None` (or 0): the warm-up, then the whole epoch. `k`: the `k` batches computing the
    most tokens, the largest last, so that its step runs with gradients and AdamW state already
    allocated: the epoch's peak, for a fraction of the time.
    """
    if not memory_steps:
        return _warmup_batches(run, warmup) + run.batches
    largest = sorted(range(len(run.batches)), key=lambda i: (run.computed_tokens[i], i))[-memory_steps:]
    if len(largest) < 2:  # one step: run it twice, the second with the optimizer state allocated
        largest = largest * 2
    return [run.batches[i] for i in largest]


def _measure_memory_fork(base_model, runs: dict[str, ModeRun], memory_steps, warmup, lr, device, say) -> None:
    for run in runs.values():
        def job(run=run):
            model = copy.deepcopy(base_model)
            model.set_attn_implementation(run.attn_implementation)
            model.train()
            optimizer = _optimizer(model, lr)
            for batch in memory_batches(run, memory_steps, warmup):
                train_step(model, optimizer, batch, device)

        run.peak_mem_bytes = peak_rss_in_child(job)
        say(f"  memory {run.name:20} {run.peak_mem_bytes / 2**20:9.1f} MiB")


def _schedule(runs: dict[str, ModeRun], repeats: int) -> list[tuple[str, int]]:
    """(mode, batch index) in turn order: each mode at the same fraction of its timed steps."""
    totals = {name: len(run.batches) * repeats for name, run in runs.items()}
    done = dict.fromkeys(runs, 0)
    order = []
    for _ in range(sum(totals.values())):
        name = min((n for n in runs if done[n] < totals[n]), key=lambda n: (done[n] + 0.5) / totals[n])
        order.append((name, done[name] % len(runs[name].batches)))
        done[name] += 1
    return order


def _time_interleaved(base_model, runs, warmup, repeats, lr, device, say) -> None:
    """Every mode its own model copy; modes take turns step by step."""
    models, optimizers = {}, {}
    for name, run in runs.items():
        model = copy.deepcopy(base_model)
        model.set_attn_implementation(run.attn_implementation)
        model.train()
        models[name], optimizers[name] = model, _optimizer(model, lr)
        run.times = [[] for _ in run.batches]
    for i in range(warmup):
        for name, run in runs.items():
            loss, _ = train_step(models[name], optimizers[name], run.batches[i % len(run.batches)], device)
            run.losses.append(loss)
    order = _schedule(runs, repeats)
    report = max(1, len(order) // 10)
    for k, (name, index) in enumerate(order):
        run = runs[name]
        loss, seconds = train_step(models[name], optimizers[name], run.batches[index], device)
        run.losses.append(loss)
        run.times[index].append(seconds)
        if (k + 1) % report == 0:
            say(f"  timed {k + 1}/{len(order)} steps")
    del models, optimizers


def _time_by_mode(base_model, init_state, runs, warmup, repeats, lr, device, measure_cuda_memory, say) -> None:
    """One model, reloaded with the initial weights for each mode; modes one after the other."""
    for name, run in runs.items():
        base_model.load_state_dict(init_state)
        base_model.set_attn_implementation(run.attn_implementation)
        base_model.train()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        optimizer = _optimizer(base_model, lr)
        run.times = [[] for _ in run.batches]
        for batch in _warmup_batches(run, warmup):
            run.losses.append(train_step(base_model, optimizer, batch, device)[0])
        for _ in range(repeats):
            for index, batch in enumerate(run.batches):
                loss, seconds = train_step(base_model, optimizer, batch, device)
                run.losses.append(loss)
                run.times[index].append(seconds)
        if measure_cuda_memory:
            run.peak_mem_bytes = int(torch.cuda.max_memory_allocated(device))
        del optimizer
        base_model.zero_grad(set_to_none=True)
        say(f"  {name:20} {len(run.batches) * repeats} timed steps, "
            f"{sum(map(sum, run.times)):.2f}s" + (f", peak {run.peak_mem_bytes / 2**30:.2f} GiB" if measure_cuda_memory else ""))
    base_model.load_state_dict(init_state)


def _measure_memory_cuda(base_model, init_state, runs, memory_steps, warmup, lr, device, say) -> None:
    """Peak CUDA memory of each mode on its own (see `memory_batches`), when timing interleaved modes."""
    for run in runs.values():
        base_model.load_state_dict(init_state)
        base_model.set_attn_implementation(run.attn_implementation)
        base_model.train()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        optimizer = _optimizer(base_model, lr)
        for batch in memory_batches(run, memory_steps, warmup):
            train_step(base_model, optimizer, batch, device)
        run.peak_mem_bytes = int(torch.cuda.max_memory_allocated(device))
        del optimizer
        base_model.zero_grad(set_to_none=True)
        say(f"  memory {run.name:20} {run.peak_mem_bytes / 2**30:7.2f} GiB")
    base_model.load_state_dict(init_state)


def _check_losses(base_model, runs, check_dtype, device, say) -> dict:
    """Epoch loss of every mode at the initial weights, in `check_dtype`."""
    model = base_model if next(base_model.parameters()).dtype == check_dtype else copy.deepcopy(base_model).to(check_dtype)
    model.eval()
    quiet = logging.getLogger("packcollate")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the fp32 check takes the exact path on CUDA; not worth a warning
    try:
        for run in runs.values():
            model.set_attn_implementation(run.attn_implementation)
            run.epoch_loss = epoch_loss(model, run.batches)
            say(f"  epoch loss {run.name:20} {run.epoch_loss:.6f}")
    finally:
        quiet.setLevel(level)
        model.set_attn_implementation("sdpa")
        model.train()
    if model is not base_model:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    values = [run.epoch_loss for run in runs.values()]
    tolerance = EPOCH_LOSS_TOLERANCE.get(check_dtype, 1e-2)
    spread = max(values) - min(values)
    return {"dtype": str(check_dtype).replace("torch.", ""), "tolerance": tolerance, "max_difference": spread,
            "passed": bool(spread <= tolerance), "losses": {name: run.epoch_loss for name, run in runs.items()}}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """`cpu-x86_64`, or the CUDA device's name with spaces replaced (`NVIDIA-H100-80GB-HBM3`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"{device.type}-{platform.machine()}"


def _label(name: str) -> str:
    """A file-name-safe label of a preset or dataset (a path becomes its last component)."""
    path = Path(name)
    label = (path.stem if path.is_file() else path.name) if (os.sep in name or path.exists()) else name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label) or "data"


def _summarise(runs: dict[str, ModeRun]) -> dict[str, dict]:
    results = {}
    for name, run in runs.items():
        medians = [float(np.median(t)) for t in run.times]
        seconds = sum(medians)
        real, computed = sum(run.real_tokens), sum(run.computed_tokens)
        step_rates = [r / m for r, m in zip(run.real_tokens, medians)]
        best = sum(min(t) for t in run.times)
        spread = [(max(t) - min(t)) / min(t) for t in run.times if len(t) > 1]
        results[name] = {
            "tokens_per_s": real / seconds,
            "tokens_per_s_best": real / best,
            "repeat_spread": float(np.median(spread)) if spread else None,
            "median_step_s": float(np.median(medians)),
            "median_step_tokens_per_s": float(np.median(step_rates)),
            "epoch_seconds": seconds,
            "steps": len(run.batches),
            "examples": run.examples,
            "real_tokens": real,
            "computed_tokens": computed,
            "padded_fraction": 1 - real / computed,
            "peak_mem_bytes": run.peak_mem_bytes,
            "first_losses": run.losses[:3],
            "epoch_loss": run.epoch_loss,
            "collate_s_per_step": run.collate_seconds / len(run.batches),
            "attn_implementation": run.attn_implementation,
            "collator": run.collator_name,
            "note": run.note,
            "step_times_s": run.times,
        }
    padded = results.get("padded")
    for r in results.values():
        r["speedup_vs_padded"] = r["tokens_per_s"] / padded["tokens_per_s"] if padded else None
        r["ideal_speedup_vs_padded"] = padded["computed_tokens"] / r["computed_tokens"] if padded else None
        if padded and padded["peak_mem_bytes"] and r["peak_mem_bytes"] is not None:
            r["mem_vs_padded"] = r["peak_mem_bytes"] / padded["peak_mem_bytes"]
        else:
            r["mem_vs_padded"] = None
    return results


def _first_step_check(runs: dict[str, ModeRun], dtype: torch.dtype) -> dict:
    same = [name for name in SAME_BATCHES if name in runs and runs[name].losses]
    losses = {name: runs[name].losses[0] for name in same}
    spread = max(losses.values()) - min(losses.values()) if len(losses) > 1 else 0.0
    tolerance = STEP_LOSS_TOLERANCE.get(dtype, 5e-2)
    return {"modes": same, "dtype": str(dtype).replace("torch.", ""), "tolerance": tolerance,
            "max_difference": spread, "passed": bool(spread <= tolerance), "losses": losses}


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(result: dict) -> str:
    """The result as a text table."""
    lines = [f"{'mode':19} {'steps':>5} {'real tok/s':>11} {'vs padded':>9} {'ideal':>6} {'pad %':>6} "
             f"{'peak mem':>10} {'vs padded':>9} {'loss step0':>11} {'epoch loss':>11}"]
    for name, r in result["modes"].items():
        first = f"{r['first_losses'][0]:.6f}" if r["first_losses"] else "-"
        epoch = "-" if r["epoch_loss"] is None else f"{r['epoch_loss']:.6f}"
        lines.append(f"{name:19} {r['steps']:5d} {r['tokens_per_s']:11.0f} {_fmt_ratio(r['speedup_vs_padded']):>9} "
                     f"{_fmt_ratio(r['ideal_speedup_vs_padded']):>6} {100 * r['padded_fraction']:5.1f}% "
                     f"{_fmt_bytes(r['peak_mem_bytes']):>10} {_fmt_ratio(r['mem_vs_padded']):>9} {first:>11} {epoch:>11}")
    return "\n".join(lines)


def _label_bars(ax, bars, ratios) -> None:
    """Write each bar's ratio to padded (`1.23x`) above it; None writes nothing."""
    for bar, ratio in zip(bars, ratios):
        if ratio is not None:
            ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)


def plot_result(result: dict, path: Path) -> Path:
    """Two bar charts (real tokens/s, peak memory per mode) into `path` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'packcollate[bench]' (or pip install matplotlib), "
                          "or pass --no-plot") from error
    names = list(result["modes"])
    modes = result["modes"]
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["#9e9e9e" if n.startswith("padded") else "#4c72b0" if n.startswith("packcollate") else "#dd8452"
              for n in names]
    rates = [modes[n]["tokens_per_s"] for n in names]
    _label_bars(ax_speed, ax_speed.bar(names, rates, color=colors), [modes[n]["speedup_vs_padded"] for n in names])
    if "padded" in modes:
        ideal = modes["padded"]["tokens_per_s"] * result["ideal_speedup"]
        ax_speed.axhline(ideal, color="k", linestyle="--", linewidth=1,
                         label=f"padded x ideal ({result['ideal_speedup']:.2f}x)")
        ax_speed.legend(fontsize=8, loc="lower right")
    ax_speed.set_ylabel("real (non-pad) tokens / s")
    ax_speed.set_title("training throughput")
    mems = [modes[n]["peak_mem_bytes"] for n in names]
    if any(m is not None for m in mems):
        values = [(m or 0) / 2**20 for m in mems]
        _label_bars(ax_mem, ax_mem.bar(names, values, color=colors), [modes[n]["mem_vs_padded"] for n in names])
        ax_mem.set_ylabel("peak memory (MiB)")
    else:
        ax_mem.text(0.5, 0.5, "memory not measured", ha="center", va="center", transform=ax_mem.transAxes)
    ax_mem.set_title(result["memory_method_short"])
    for ax in (ax_speed, ax_mem):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle(f"{result['preset']} on {result['dataset']}, {result['batch_size']} examples/step, "
                 f"{result['device']}, {result['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _command(kwargs: dict) -> str:
    """The `packcollate bench` command line equivalent to `run_benchmark(**kwargs)`."""
    parts = ["packcollate", "bench"]
    negated = {"loss_check": "--no-loss-check", "plot": "--no-plot"}
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if key in negated:
            if not value:
                parts.append(negated[key])
            continue
        if value is None or value is False or (key in ("interleave", "memory", "hf_attn") and value == "auto"):
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def run_benchmark(
    preset: str = "tiny",
    dataset: str = "flan",
    *,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    modes: Sequence[str] | None = None,
    max_tokens: int | None = None,
    max_length: int | None = None,
    tokenizer: str | None = None,
    text_field: str | None = None,
    load_weights: bool = False,
    interleave: str = "auto",
    memory: str = "auto",
    memory_steps: int | None = 2,
    loss_check: bool = True,
    hf_attn: str = "auto",
    lr: float = 1e-5,
    seed: int = 0,
    threads: int | None = None,
    out: str | Path | None = None,
    plot: bool = True,
    command: str | None = None,
    quiet: bool = False,
) -> dict:
    """Run the benchmark; print a table, write `train_throughput_<preset>_<dataset>.json` (+ `.png`) to `out`.

    Args:
        preset: `"micro"`, `"tiny"`, `"llama-1b"` or a local model directory (see `PRESETS`).
        dataset: `"flan"`, `"orcamath"`, `"uniform"`, `"arithmetic"`, a `.jsonl` file or a `datasets`
            directory (with `tokenizer`).
        device: default `"cuda"` when available, else `"cpu"`.
        dtype: `"fp32"`, `"bf16"` or `"fp16"`; default fp32 on CPU, bf16 on CUDA.
        batch_size: examples per fixed step (default 16 on CPU, 8 on CUDA).
        steps: fixed batches in the epoch; the epoch holds `steps * batch_size` examples (default 8 / 40).
        warmup: untimed steps per mode before timing (default 1 / 3).
        repeats: times every batch is timed; its median counts (default 3 on CPU, 1 on CUDA).
        modes: subset of `MODES` (default all).
        max_tokens: token budget of `packcollate-budget` and TRL's row length (default: the mean
            real tokens of a fixed batch, so budget steps do the same work as fixed ones, balanced).
        max_length: truncate examples to this many tokens.
        tokenizer: local tokenizer directory for a file dataset.
        text_field: the field holding the text (default `text`, else prompt/completion, else messages).
        load_weights: load a local model directory's weights instead of a random init.
        interleave: `"step"` (modes take turns, each with its own model copy), `"mode"` (one mode
            after the other on one model) or `"auto"` (step on CPU, mode on CUDA).
        memory: `"fork"` (CPU peak RSS in a child per mode), `"cuda"`, `"off"` or `"auto"`.
        memory_steps: steps of a separate memory measurement (CPU fork, or CUDA with interleaved
            timing): the `k` largest batches of the mode (default 2), or 0 for warm-up + the whole
            epoch. With CUDA and one mode after the other, the peak is that of the timed run itself.
        loss_check: evaluate every mode's epoch loss at the initial weights in fp32.
        hf_attn: attention of `hf-flatten`: `"auto"` (flash_attention_2 on CUDA when installed, else sdpa).
        lr: AdamW learning rate.
        seed: seed of the data, the sampler and the initial weights.
        threads: `torch.set_num_threads` (CPU).
        out: output directory (default `benchmarks/results/<device name>/`); `""` writes nothing.
        plot: write the PNG.
        command: the command line recorded in the JSON (default: the equivalent `packcollate bench`).
        quiet: print nothing.

    Returns:
        The result dict (also written as JSON): `device`, `preset`, `dataset`, `command`,
        `ideal_speedup`, `modes` (per mode: `tokens_per_s`, `peak_mem_bytes`, `speedup_vs_padded`,
        `mem_vs_padded`, …), `loss_check`, and the settings.
    """
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    kwargs = {k: v for k, v in locals().items() if k not in ("say", "command", "quiet", "out")}
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device_.type == "cuda"
    dtype_ = DTYPES[dtype or ("bf16" if on_cuda else "fp32")]
    batch_size = batch_size or (8 if on_cuda else 16)
    steps = steps or (40 if on_cuda else 8)
    warmup = (3 if on_cuda else 1) if warmup is None else warmup
    repeats = repeats or (1 if on_cuda else 3)
    modes = list(modes) if modes else list(MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes: expected names from {MODES}, got {unknown}")
    if interleave == "auto":
        interleave = "mode" if on_cuda else "step"
    if interleave not in ("step", "mode"):
        raise ValueError(f"interleave: expected 'auto', 'step' or 'mode', got {interleave!r}")
    if memory == "auto":
        memory = "cuda" if on_cuda else ("fork" if fork_memory_available() else "off")
    if memory == "cuda" and not on_cuda:
        raise ValueError(f"memory='cuda': expected a CUDA device, got {device_}")
    if memory == "fork" and (on_cuda or not fork_memory_available()):
        raise ValueError("memory='fork': expected a CPU run on Linux (os.fork and /proc/self/clear_refs)")
    if memory not in ("fork", "cuda", "off"):
        raise ValueError(f"memory: expected 'auto', 'fork', 'cuda' or 'off', got {memory!r}")
    if threads:
        torch.set_num_threads(threads)

    started = time.perf_counter()
    vocab_hint = PRESETS[preset]["vocab_size"] if preset in PRESETS else None
    if vocab_hint is None:
        from transformers import AutoConfig

        vocab_hint = AutoConfig.from_pretrained(preset, local_files_only=True).vocab_size
    data = load_data(dataset, steps * batch_size, vocab_size=vocab_hint, seed=seed, tokenizer=tokenizer,
                     text_field=text_field, max_length=max_length)
    lengths = data.lengths
    model = build_model(preset, data.vocab_size, dtype_, device_, load_weights=load_weights, seed=seed)
    n_params = _parameters(model)
    name = device_name(device_)
    say(f"packcollate bench: {preset} ({n_params / 1e6:.1f} M parameters, {str(dtype_).replace('torch.', '')}) "
        f"on {dataset}, {len(lengths)} examples ({int(lengths.sum())} tokens; length mean {lengths.mean():.0f}, "
        f"median {np.median(lengths):.0f}, max {lengths.max()}), {batch_size} examples/step, {name}, "
        f"{torch.get_num_threads()} threads")

    runs, max_tokens, notes = build_modes(data, modes, batch_size, device_, max_tokens=max_tokens,
                                          hf_attn=hf_attn, seed=seed)
    for note in notes:
        say(f"note: {note}")
    init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    if memory == "fork":  # first, while this process has allocated and freed the least
        say("peak memory: each mode in a forked child (one thread), peak anonymous RSS increase")
        _measure_memory_fork(model, runs, memory_steps, warmup, lr, device_, say)
    loss_result = None
    if loss_check:
        say("loss check: token-mean loss over the whole epoch at the initial weights (fp32, no optimizer step)")
        loss_result = _check_losses(model, runs, torch.float32, device_, say)
    say(f"timing: {warmup} warm-up steps, then every batch x {repeats}, "
        f"{'modes taking turns step by step' if interleave == 'step' else 'one mode after the other'}")
    if interleave == "step":
        _time_interleaved(model, runs, warmup, repeats, lr, device_, say)
        if memory == "cuda":
            _measure_memory_cuda(model, init_state, runs, memory_steps, warmup, lr, device_, say)
    else:
        _time_by_mode(model, init_state, runs, warmup, repeats, lr, device_, memory == "cuda", say)

    modes_result = _summarise(runs)
    fixed = fixed_batches(len(lengths), batch_size)
    padded_tokens = sum(len(b) * int(lengths[b].max()) for b in fixed)
    ideal = padded_tokens / int(lengths.sum())
    first_step = _first_step_check(runs, dtype_)
    checks = {"first_step": first_step, "epoch": loss_result,
              "passed": bool(first_step["passed"] and (loss_result is None or loss_result["passed"]))}
    which = ("warm-up + the whole epoch" if not memory_steps else
             f"its {memory_steps} batch{'es' if memory_steps > 1 else ''} computing the most tokens, largest last")
    memory_method = {
        "cuda": "torch.cuda.max_memory_allocated, reset before each mode; only that mode's model, gradients, "
                "AdamW state and activations on the device; over "
                + ("the mode's warm-up and timed steps" if interleave == "mode" else which),
        "fork": "peak anonymous RSS increase of a forked child per mode that copies the initial model and "
                f"trains on {which}, one thread (VmHWM after a /proc/self/clear_refs reset, less "
                "file-backed RssFile/RssShmem at the end, minus RssAnon before): weights + gradients + AdamW "
                "state + activations + allocator overhead",
        "off": "not measured",
    }[memory]
    label = {"cuda": "peak CUDA memory", "fork": "peak RSS increase (a fork per mode)", "off": "memory"}[memory]
    result = {
        "benchmark": "train_throughput",
        "device": name,
        "preset": preset,
        "dataset": dataset,
        "command": command or _command(kwargs),
        "dtype": str(dtype_).replace("torch.", ""),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "interleave": interleave,
        "memory_method": memory_method,
        "memory_method_short": label,
        "threads": torch.get_num_threads(),
        "max_tokens": max_tokens,
        "ideal_speedup": ideal,
        "data": {"source": data.source, "examples": len(lengths), "tokens": int(lengths.sum()),
                 "mean_length": float(lengths.mean()), "median_length": float(np.median(lengths)),
                 "max_length": int(lengths.max()), "padded_tokens": padded_tokens,
                 "completion_only": any("labels" in e for e in data.examples[:1])},
        "model": {"parameters": n_params, "config": {k: v for k, v in PRESETS.get(preset, {}).items()},
                  "vocab_size": int(model.config.vocab_size), "random_init": not load_weights},
        "versions": library_versions("torch", "transformers", "trl"),
        "modes": modes_result,
        "loss_check": checks,
        "notes": notes,
        "kernels": describe(),
        "wall_seconds": None,
    }
    targets = _targets(result, device_.type)
    if targets:
        result["targets"] = targets
    result["wall_seconds"] = time.perf_counter() - started

    say("")
    say(f"{preset} on {dataset}: {batch_size} examples/step, {str(dtype_).replace('torch.', '')}, {name}; "
        f"peak memory = {label}")
    say(format_table(result))
    say(f"ideal speed-up (padded tokens / real tokens): {ideal:.2f}x; token budget of the budget/bfd modes: {max_tokens}")
    say(f"first-step loss, same batches ({', '.join(first_step['modes'])}): max difference "
        f"{first_step['max_difference']:.2e} (tolerance {first_step['tolerance']:g}) -> "
        f"{'match' if first_step['passed'] else 'MISMATCH'}")
    if loss_result is not None:
        say(f"epoch loss at init, every mode (fp32): max difference {loss_result['max_difference']:.2e} "
            f"(tolerance {loss_result['tolerance']:g}) -> {'match' if loss_result['passed'] else 'MISMATCH'}")
    spreads = [r["repeat_spread"] for r in modes_result.values() if r["repeat_spread"] is not None]
    if spreads and max(spreads) > NOISY_SPREAD:
        say(f"warning: noisy timings: repeats of the same batch differ by up to {100 * max(spreads):.0f}% (median "
            f"over batches, worst mode); the machine was busy: rerun on a quiet one, or compare the best-case "
            f"rates in the JSON (tokens_per_s_best)")
    for target in targets:
        say(f"target {target['mode']}: {target['what']} -> {'met' if target['met'] else 'NOT met'}")
    say(describe())

    if out != "":
        out_dir = Path(out) if out else Path("benchmarks/results") / name
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"train_throughput_{_label(preset)}_{_label(dataset)}"
        json_path = out_dir / f"{stem}.json"
        if plot:
            try:
                result["plot"] = str(plot_result(result, out_dir / f"{stem}.png"))
            except ImportError as error:
                say(f"no plot: {error}")
        json_path.write_text(json.dumps(result, indent=2))
        result["json"] = str(json_path)
        say(f"wrote {json_path}" + (f" and {result['plot']}" if "plot" in result else ""))
    return result


def _targets(result: dict, device_type: str) -> list[dict]:
    spec = TARGETS.get((device_type, result["preset"], result["dataset"]), {})
    found = []
    for mode, (speed, mem) in spec.items():
        r = result["modes"].get(mode)
        if r is None or r["speedup_vs_padded"] is None:
            continue
        met = r["speedup_vs_padded"] >= speed
        what = f"speed-up {r['speedup_vs_padded']:.2f}x >= {speed}x"
        if mem is not None and r["mem_vs_padded"] is not None:
            met = met and r["mem_vs_padded"] <= mem
            what += f", memory {r['mem_vs_padded']:.2f}x <= {mem}x"
        found.append({"mode": mode, "what": what, "met": bool(met)})
    return found


def save_result(result: dict, path: Path) -> Path:
    """Write a benchmark's result as indented JSON to `path` (its folder made if missing); say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path


def library_versions(*names: str) -> dict[str, str]:
    """`{name: version}` of Python, packcollate and each of `names` that imports (the others are left out)."""
    import importlib

    from . import __version__

    found = {"python": platform.python_version(), "packcollate": __version__}
    for name in names:
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return found


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny",
                        help=f"model: one of {', '.join(PRESETS)} or a local model directory (default tiny)")
    parser.add_argument("--dataset", default="flan",
                        help=f"lengths: one of {', '.join(BUILTIN_DATASETS)}, a .jsonl file or a datasets "
                             "directory (default flan)")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory for a file dataset")
    parser.add_argument("--text-field", default=None, help="field holding the text (default: text, "
                                                           "else prompt/completion, else messages)")
    parser.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    parser.add_argument("--load-weights", action="store_true", help="load a model directory's weights "
                                                                    "(default: random init from its config)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per fixed step (default 16 CPU, 8 CUDA)")
    parser.add_argument("--steps", type=int, default=None,
                        help="fixed batches in the epoch (default 8 CPU, 40 CUDA); epoch = steps x batch size examples")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default 1 CPU, 3 CUDA)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="times each batch is timed, median kept (default 3 CPU, 1 CUDA)")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="token budget of packcollate-budget / trl-bfd (default: mean padded tokens per batch)")
    parser.add_argument("--interleave", choices=("auto", "step", "mode"), default="auto",
                        help="modes take turns by step (CPU default) or run one after the other (CUDA default)")
    parser.add_argument("--memory", choices=("auto", "fork", "cuda", "off"), default="auto",
                        help="peak memory: fork (CPU: peak RSS increase of a forked child per mode), cuda "
                             "(max_memory_allocated), off")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps of the separate memory run: the k batches computing the most tokens, "
                             "largest last (default 2); 0: warm-up + the whole epoch")
    parser.add_argument("--no-loss-check", dest="loss_check", action="store_false",
                        help="skip the fp32 epoch-loss check at the initial weights")
    parser.add_argument("--hf-attn", default="auto", help="attention of hf-flatten (default: flash_attention_2 on "
                                                          "CUDA when installed, else sdpa)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device name>/)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write no PNG")


def main(args: argparse.Namespace) -> int:
    argv = sys.argv[1:] if sys.argv and sys.argv[0] else []
    command = shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "packcollate", *argv])
    result = run_benchmark(
        args.preset,
        args.dataset,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        modes=args.modes.split(",") if args.modes else None,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        load_weights=args.load_weights,
        interleave=args.interleave,
        memory=args.memory,
        memory_steps=args.memory_steps,
        loss_check=args.loss_check,
        hf_attn=args.hf_attn,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        out=args.out,
        plot=args.plot,
        command=command,
    )
    return 0 if result["loss_check"]["passed"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m packcollate.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
