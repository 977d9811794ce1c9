"""Preference pairs packed into one row: chosen and rejected of every pair, no padding.

    collator = PackedPreferenceCollator(max_length=1024)        # DPO: prompt_ids, chosen_ids, rejected_ids
    batch = collator([{"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}, ...])

    collator = PackedPairCollator()                             # reward models: chosen_ids, rejected_ids
    batch = collator([{"chosen_ids": [...], "rejected_ids": [...], "margin": 0.5}, ...])

For `B` pairs the row holds `k = 2B` sequences, the chosen ones first, then the rejected ones (TRL's
order: `per_sequence.chunk(2)` splits them), each `prompt + completion` for DPO:

| key | shape, dtype | meaning |
| --- | --- | --- |
| `input_ids` | `(1, N)` int64 | the `2B` sequences, back to back |
| `completion_mask` | `(1, N)` int64 | DPO only: 1 on completion tokens, 0 on the prompt |
| `position_ids` | `(1, N)` int64 | `0 … l_i-1` for every sequence |
| `cu_seq_lens_q`, `cu_seq_lens_k` | `(2B+1,)` int32 | sequence offsets `[0, l_0, …, N]` |
| `max_length_q`, `max_length_k` | Python int | longest sequence |
| `ref_chosen_logps`, `ref_rejected_logps` | `(B,)` float | DPO, when the examples carry them (TRL's precompute) |
| `margin` | `(B,)` float32 | reward models, when the examples carry it |

Truncation follows TRL's `DataCollatorForPreference`: each sequence (prompt + completion) is cut to
`max_length`, keeping its start (`"keep_start"`) or its end (`"keep_end"`). The collators never emit
an `attention_mask`: a packed batch must not carry one (transformers would ignore the packing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError, MissingKeyError, is_int
from ..layout import cumulative, packing_keys, positions, to_torch

TRUNCATION_MODES = ("keep_start", "keep_end")
#: Keys of a single sequence that a reward pair must not carry (they would be silently ignored).
IGNORED_PAIR_KEYS = ("input_ids", "attention_mask", "labels")


_INT64_MAX = np.iinfo(np.int64).max


def _ids(example: dict, index: int, key: str, allow_empty: bool = False) -> np.ndarray:
    """`example[key]` as `(L,)` int64 token ids; InputError unless a flat list of ids in [0, 2**63)."""
    if not isinstance(example, dict) or key not in example:
        given = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise MissingKeyError(f"example {index}: expected a key {key!r} (a list of token ids), got {given}")
    value = example[key]
    ids = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu") or (ids.size == 0 and not allow_empty):
        raise InputError(
            f"example {index}, key {key!r}: expected a non-empty 1-D list of int token ids, got "
            f"{type(value).__name__} of shape {ids.shape} and dtype {ids.dtype}"
        )
    if ids.size and (ids.min() < 0 or (ids.dtype.kind == "u" and ids.max() > _INT64_MAX)):
        j = int(np.flatnonzero((ids < 0) | (ids > _INT64_MAX) if ids.dtype.kind == "u" else ids < 0)[0])
        raise InputError(f"example {index}, key {key!r}: expected token ids in [0, 2**63), got {int(ids[j])} at position {j}")
    return ids.astype(np.int64, copy=False)


def _floats(examples: Sequence[dict], key: str, dtype) -> torch.Tensor | None:
    """`(B,)` the per-pair number `key` of every example (None when no example has it); InputError for a
    key in only some examples, or a value that is not one finite number (None, a string, NaN, inf)."""
    has = [key in example for example in examples]
    if not any(has):
        return None
    if not all(has):
        i = has.index(False)
        j = has.index(True)
        raise MissingKeyError(f"example {i}: expected a key {key!r} (example {j} has one: every pair or none), "
                              f"got {sorted(examples[i])}")
    values = [example[key] for example in examples]
    for i, value in enumerate(values):
        number = value.item() if isinstance(value, (torch.Tensor, np.ndarray)) and np.size(value) == 1 else value
        if isinstance(number, (bool, np.bool_)) or not isinstance(number, (int, float, np.integer, np.floating)):
            raise InputError(f"example {i}, key {key!r}: expected a finite number, got {type(value).__name__} {value!r}"[:200])
    out = torch.tensor([float(v) for v in values], dtype=dtype)
    if not bool(torch.isfinite(out).all()):
        i = int((~torch.isfinite(out)).nonzero()[0, 0])
        raise InputError(f"example {i}, key {key!r}: expected a finite number (a NaN loss is not an answer), "
                         f"got {float(out[i])}")
    return out


class PackedPreferenceCollator:
    """DPO pairs `{"prompt_ids", "chosen_ids", "rejected_ids"}` -> one packed row of `2B` sequences.

    Args:
        max_length: tokens of one sequence (prompt + completion) at most; None (default) keeps all.
        truncation_mode: `"keep_start"` (default) or `"keep_end"`, as TRL's `DPOConfig.truncation_mode`.

    Returns the table of the module docstring. Per-example ref log-probs (`ref_chosen_logps`,
    `ref_rejected_logps`) pass through as `(B,)` tensors.
    """

    def __init__(self, max_length: int | None = None, truncation_mode: str = "keep_start"):
        if max_length is not None and (not is_int(max_length) or max_length < 1):
            raise InputError(f"max_length: expected a positive int or None, got {max_length!r}")
        if truncation_mode not in TRUNCATION_MODES:
            raise InputError(f"truncation_mode: expected one of {TRUNCATION_MODES}, got {truncation_mode!r}")
        self.max_length = max_length
        self.truncation_mode = truncation_mode

    def __call__(self, examples: Sequence[dict]) -> dict:
        if not examples:
            raise InputError("examples: expected at least one preference pair, got none")
        prompts = [_ids(ex, i, "prompt_ids", allow_empty=True) for i, ex in enumerate(examples)]
        chosen = [_ids(ex, i, "chosen_ids") for i, ex in enumerate(examples)]
        rejected = [_ids(ex, i, "rejected_ids") for i, ex in enumerate(examples)]
        prompt_lengths = np.fromiter((len(p) for p in prompts), np.int64, len(prompts))
        completion_lengths = np.fromiter((len(c) for c in chosen + rejected), np.int64, 2 * len(prompts))
        prompt_lengths = np.concatenate([prompt_lengths, prompt_lengths])  # (2B,): chosen, then rejected
        full = prompt_lengths + completion_lengths
        # pieces: prompt_0, chosen_0, …, prompt_0, rejected_0, …
        tokens = np.concatenate([piece for pair in zip(prompts + prompts, chosen + rejected) for piece in pair])
        position = positions(cumulative(full), full)  # within its sequence
        position_from_end = np.repeat(full, full) - position  # 1 at the last token
        kept = full if self.max_length is None else np.minimum(full, self.max_length)
        if self.truncation_mode == "keep_start":
            keep = position < np.repeat(kept, full)
        else:
            keep = position_from_end <= np.repeat(kept, full)
        completion = position >= np.repeat(prompt_lengths, full)
        batch = {
            "input_ids": torch.from_numpy(tokens[keep]).unsqueeze(0),
            "completion_mask": torch.from_numpy(completion[keep].astype(np.int64)).unsqueeze(0),
            **to_torch(packing_keys(kept)),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            values = _floats(examples, key, torch.get_default_dtype())
            if values is not None:
                batch[key] = values
        return batch


class PackedPairCollator:
    """Reward-model pairs `{"chosen_ids", "rejected_ids"}` (optional `"margin"`) -> one packed row of
    `2B` sequences (chosen first); the table of the module docstring. Long sequences are TRL's to
    filter (`RewardConfig.max_length`), as with its padding collator."""

    def __call__(self, examples: Sequence[dict]) -> dict:
        if not examples:
            raise InputError("examples: expected at least one preference pair, got none")
        for i, example in enumerate(examples):
            ignored = [key for key in IGNORED_PAIR_KEYS if isinstance(example, dict) and key in example]
            if ignored:
                raise InputError(
                    f"example {i}: expected a pair of 'chosen_ids' and 'rejected_ids', got also {ignored}, which this "
                    f"collator would ignore (each sequence is unpadded); remove them, or tokenize into chosen/rejected ids"
                )
        sequences = [_ids(ex, i, "chosen_ids") for i, ex in enumerate(examples)]
        sequences += [_ids(ex, i, "rejected_ids") for i, ex in enumerate(examples)]
        lengths = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))
        batch = {"input_ids": torch.from_numpy(np.concatenate(sequences)).unsqueeze(0), **to_torch(packing_keys(lengths))}
        margin = _floats(examples, "margin", torch.float)
        if margin is not None:
            batch["margin"] = margin
        return batch


def pair_tokens(example: dict, max_length: int | None = None) -> int:
    """Tokens a DPO pair puts in a packed row: `prompt + chosen` and `prompt + rejected`, each cut to `max_length`."""
    prompt = len(example["prompt_ids"])
    chosen, rejected = prompt + len(example["chosen_ids"]), prompt + len(example["rejected_ids"])
    if max_length is not None:
        chosen, rejected = min(chosen, max_length), min(rejected, max_length)
    return chosen + rejected
