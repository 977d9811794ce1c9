"""Turn a list of feature dicts into validated, flat numpy arrays.

This is the one place that looks at user input. The fast path concatenates each key once
(`np.concatenate`) and checks the result with vectorised numpy; only when that check fails does it
walk the examples one by one to name the culprit. Errors name the example index, the key, what was
expected and what was given. Inputs are never written to.

Shapes: for `k` examples of lengths `l_0 … l_{k-1}`, `N = sum(l_i)`:
`FlatFeatures.tokens[key]` is `(N,)`, `FlatFeatures.example_lengths` is `(k,)` and
`FlatFeatures.segment_lengths` is `(s,)` with `s >= k` when rows are pre-packed (`seq_lengths`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError, InputTypeError, MissingKeyError
from ..layout import IGNORE_INDEX, PACKING_KEYS, cumulative

#: Per-token keys whose values are 0/1 masks over `input_ids`.
MASK_KEYS = ("completion_mask", "assistant_masks")
#: Keys the collators understand themselves; anything else is an extra per-token key or an error.
KNOWN_KEYS = ("input_ids", "labels", "attention_mask", "seq_lengths", *MASK_KEYS)
_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class FlatFeatures:
    """A batch of examples as flat arrays.

    Attributes:
        tokens: per-token arrays, each `(N,)`: always `input_ids` (int64); `labels` (int64) when the
            examples carry them; masks from `MASK_KEYS` (bool); extra per-token keys as given.
        example_lengths: `(k,)` int64, tokens of each input example (a pre-packed row counts once).
        segment_lengths: `(s,)` int64, tokens of each sequence to keep apart: the examples, or the
            sub-sequences of pre-packed rows.
        segment_example: `(s,)` int64, the input example each segment came from (for error messages).
        passthrough: per-example values of the keys listed to pass through, one list entry per example.
    """

    tokens: dict[str, np.ndarray]
    example_lengths: np.ndarray
    segment_lengths: np.ndarray
    segment_example: np.ndarray
    passthrough: dict[str, list] = field(default_factory=dict)


def _describe(value) -> str:
    """A short description of a value for error messages: its type and, when short, the value."""
    text = repr(value.item() if isinstance(value, np.generic) else value)  # 3, not np.int64(3)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _to_numpy(value):
    """Torch tensors to numpy (CPU, detached); everything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _first_non_integer(value, arr: np.ndarray):
    """The first element of `value` that is not an integer (bools count as non-integers)."""
    items = value if isinstance(value, (list, tuple)) else arr.tolist()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            return item
    return arr.dtype  # pragma: no cover - only reached for exotic array dtypes


def _diagnose_sequence(values: list, key: str, *, integer: bool, mask: bool) -> None:
    """Walk the examples of one key and raise a ValueError for the first malformed value."""
    if mask:
        expected, kinds = "a flat sequence of 0/1 values", "iub"
    elif integer:
        expected, kinds = "a flat sequence of integers", "iu"
    else:
        expected, kinds = "a flat sequence of numbers", "iubf"
    for i, value in enumerate(values):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise InputError(f"example {i}, key {key!r}: expected {expected}, got {_describe(value)}")
        try:
            arr = np.asarray(value)
        except ValueError:
            raise InputError(
                f"example {i}, key {key!r}: expected {expected}, got a ragged nested sequence {_describe(value)}"
            ) from None
        if arr.ndim == 0:
            raise InputError(f"example {i}, key {key!r}: expected {expected}, got the scalar {_describe(value)}")
        if arr.ndim != 1:
            raise InputError(
                f"example {i}, key {key!r}: expected {expected}, got a nested sequence of shape {arr.shape}"
            )
        if arr.size and arr.dtype.kind not in kinds:
            bad = _first_non_integer(value, arr) if integer or mask else value
            if isinstance(bad, np.dtype) and isinstance(value, (list, tuple)):  # all ints: some beyond int64
                j = next(j for j, item in enumerate(value) if not -_INT64_MAX - 1 <= item <= _INT64_MAX)
                raise InputError(f"example {i}, key {key!r}: expected integers below 2**63, got {value[j]} at position {j}")
            raise InputError(f"example {i}, key {key!r}: expected {expected}, got {_describe(bad)}")


def _signed(array: np.ndarray, example: int, key: str) -> np.ndarray:
    """An unsigned integer array as int64 (a copy), refusing values int64 cannot hold: numpy would
    otherwise wrap `uint64` ids above 2**63 to negative ids, or turn a uint64/int64 mix into floats."""
    if array.dtype.kind != "u" or array.ndim != 1:
        return array
    if array.dtype.itemsize == 8 and int(array.max()) > _INT64_MAX:
        j = int(np.flatnonzero(array > _INT64_MAX)[0])
        raise InputError(
            f"example {example}, key {key!r}: expected integers below 2**63, got {int(array[j])} at position {j}"
        )
    return array.astype(np.int64)


def concat_key(features: Sequence[Mapping], key: str, *, integer: bool = True, mask: bool = False):
    """Concatenate `features[i][key]` for all i into one `(N,)` array; return it with the `(k,)` lengths.

    Raises ValueError naming the example for a scalar, nested, ragged or non-integer value.
    """
    values = [_to_numpy(f[key]) for f in features]
    allowed = "iub" if mask else ("iu" if integer else "iubf")
    try:
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        # One array per example (the conversion np.concatenate would do anyway), so that each example's
        # dtype is checked before promotion: a bool example among int ones would otherwise become ints,
        # and an empty list (float64) would turn the whole key into floats.
        arrays = [np.asarray(v) for v in values]
        nonempty = [_signed(a, i, key) for i, a in enumerate(arrays) if a.size]
        flat = np.concatenate(nonempty or arrays)
    except (TypeError, ValueError):
        _diagnose_sequence(values, key, integer=integer, mask=mask)
        raise  # pragma: no cover - the diagnosis always finds the culprit
    if (
        flat.ndim != 1
        or flat.shape[0] != lengths.sum()
        or any(a.dtype.kind not in allowed for a in nonempty)
    ):
        _diagnose_sequence(values, key, integer=integer, mask=mask)
        # A well-formed value of each example that still concatenates wrongly: mixed kinds across examples.
        raise InputError(f"key {key!r}: expected {'integers' if integer else 'numbers'} in every example, "
                         f"got values of dtype {flat.dtype} once concatenated")
    return flat, lengths


def _example_of_token(token_index: int, lengths: np.ndarray) -> tuple[int, int]:
    """(example index, position inside the example) of a flat token index."""
    ends = np.cumsum(lengths)
    example = int(np.searchsorted(ends, token_index, side="right"))
    start = int(ends[example - 1]) if example else 0
    return example, token_index - start


def _check_lengths_match(key: str, lengths: np.ndarray, expected: np.ndarray, what: str) -> None:
    if not np.array_equal(lengths, expected):
        i = int(np.flatnonzero(lengths != expected)[0])
        raise InputError(
            f"example {i}, key {key!r}: expected {int(expected[i])} values ({what}), got {int(lengths[i])}"
        )


def _check_labels(labels: np.ndarray, lengths: np.ndarray) -> None:
    """Labels `(N,)` are token ids (>= 0) or -100; anything else (-1, a mask value) would be read as a token."""
    bad = (labels < 0) & (labels != IGNORE_INDEX)
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        i, j = _example_of_token(t, lengths)
        raise InputError(
            f"example {i}, key 'labels': expected token ids (>= 0) or {IGNORE_INDEX} (not trained on), got "
            f"{int(labels[t])} at position {j}"
        )


def _check_keys(features: Sequence[Mapping]) -> list[str]:
    if isinstance(features, Mapping) or not isinstance(features, Sequence):
        raise InputTypeError(f"expected a list of feature dicts, got {_describe(features)}")
    if len(features) == 0:
        raise InputError("expected at least one example, got an empty batch")
    for i, f in enumerate(features):
        if not isinstance(f, Mapping):
            raise InputTypeError(f"example {i}: expected a dict of features, got {_describe(f)}")
    keys = list(features[0].keys())
    if "input_ids" not in keys:
        raise MissingKeyError(f"example 0: expected key 'input_ids', got keys {sorted(keys)}")
    key_set = set(keys)
    for i, f in enumerate(features):
        if f.keys() != key_set:
            missing = sorted(key_set - f.keys())
            extra = sorted(f.keys() - key_set)
            detail = f"lacks {missing}" if missing else f"has extra {extra}"
            raise MissingKeyError(f"example {i}: expected the same keys as example 0 {sorted(keys)}, but it {detail}")
    return keys


def _segments(features, example_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment lengths and their example index, from `seq_lengths` when rows are pre-packed."""
    if "seq_lengths" not in features[0]:
        return example_lengths, np.arange(len(example_lengths), dtype=np.int64)
    seg, counts = concat_key(features, "seq_lengths")
    if np.any(counts == 0):
        i = int(np.flatnonzero(counts == 0)[0])
        raise InputError(f"example {i}, key 'seq_lengths': expected at least one sub-sequence length, got none")
    if seg.min() <= 0:
        i, j = _example_of_token(int(np.flatnonzero(seg <= 0)[0]), counts)
        raise InputError(
            f"example {i}, key 'seq_lengths': expected positive lengths, got {int(seg[np.flatnonzero(seg <= 0)[0]])} "
            f"at sub-sequence {j}"
        )
    sums = np.add.reduceat(seg, cumulative(counts)[:-1])
    if not np.array_equal(sums, example_lengths):
        i = int(np.flatnonzero(sums != example_lengths)[0])
        raise InputError(
            f"example {i}, key 'seq_lengths': expected lengths summing to the row length {int(example_lengths[i])}, "
            f"got {seg[int(np.sum(counts[:i])):int(np.sum(counts[: i + 1]))].tolist()} (sum {int(sums[i])})"
        )
    return seg.astype(np.int64, copy=False), np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def flatten_features(features: Sequence[Mapping], passthrough_keys: Sequence[str] = ()) -> FlatFeatures:
    """Validate `features` and return them as flat arrays.

    Args:
        features: `k` dicts, each with `input_ids` (list, numpy array or torch tensor of non-negative
            ints) and optionally `labels`, `attention_mask` (all ones), `completion_mask` /
            `assistant_masks` (0/1 per token), `seq_lengths` (sub-sequence lengths of a pre-packed
            row), extra per-token keys (same length as `input_ids`), and the `passthrough_keys`.
        passthrough_keys: per-example keys returned as lists instead of being rejected.

    Raises:
        ValueError / KeyError / TypeError naming the example, the key, what was expected and what was given.
    """
    keys = _check_keys(features)
    ids, lengths = concat_key(features, "input_ids")
    if not lengths.all():
        i = int(np.flatnonzero(lengths == 0)[0])
        raise InputError(f"example {i}, key 'input_ids': expected at least one token, got 0 tokens")
    if ids.min() < 0:
        t = int(np.flatnonzero(ids < 0)[0])
        i, j = _example_of_token(t, lengths)
        raise InputError(
            f"example {i}, key 'input_ids': expected non-negative token ids, got {int(ids[t])} at position {j}"
        )
    tokens = {"input_ids": ids.astype(np.int64, copy=False)}
    passthrough: dict[str, list] = {}

    for key in keys:
        if key in ("input_ids", "seq_lengths"):
            continue
        if key in passthrough_keys:
            passthrough[key] = [f[key] for f in features]
            continue
        if key in PACKING_KEYS:  # the collator computes it: it would be overwritten
            raise InputError(
                f"example 0, key {key!r}: expected no {key!r} in the examples (the collator computes it and would "
                f"overwrite it), got one; remove or rename the key"
            )
        is_mask = key in MASK_KEYS or key == "attention_mask"
        if key not in KNOWN_KEYS:
            first = features[0][key]
            if isinstance(first, (str, bytes)) or not hasattr(first, "__len__") or np.ndim(_to_numpy(first)) == 0:
                raise InputError(
                    f"example 0, key {key!r}: expected a per-token sequence of {int(lengths[0])} values, got "
                    f"{_describe(first)}; list the key in passthrough_keys to return it per example, or remove it"
                )
        values, value_lengths = concat_key(features, key, integer=key in KNOWN_KEYS, mask=is_mask)
        _check_lengths_match(key, value_lengths, lengths, "the length of its input_ids")
        if is_mask:
            bad = (values != 0) & (values != 1)
            if bad.any():
                t = int(np.flatnonzero(bad)[0])
                i, j = _example_of_token(t, lengths)
                raise InputError(f"example {i}, key {key!r}: expected 0/1 values, got {values[t].item()!r} at position {j}")
            values = values.astype(bool, copy=False)
        if key == "attention_mask":
            if not values.all():
                i, _ = _example_of_token(int(np.flatnonzero(~values)[0]), lengths)
                zeros = int(len(features[i][key]) - np.count_nonzero(_to_numpy(features[i][key])))
                raise InputError(
                    f"example {i}, key 'attention_mask': expected all ones (examples are concatenated, not "
                    f"padded: pass them unpadded), got {zeros} zeros"
                )
            continue  # an all-ones mask carries no information; never emitted with a packed batch
        if key == "labels":
            _check_labels(values, lengths)
        if key == "labels" or values.dtype.kind in "iu":
            values = values.astype(np.int64, copy=False)
        tokens[key] = values

    segment_lengths, segment_example = _segments(features, lengths)
    return FlatFeatures(tokens, lengths, segment_lengths, segment_example, passthrough)
