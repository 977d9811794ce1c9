"""Example lengths of a dataset: measured (from Arrow or row by row), checked, and summarised.

The token budget (`TokenBudgetBatchSampler`, `PackedTrainer(max_tokens_per_batch=...)`) and
`packcollate stats` both need the number of tokens of every example before any batch is made:

- `token_counts(rows)`: a `datasets.Dataset`'s `length` or `input_ids` column read in Arrow (one
  vectorised call), or a list of dicts checked row by row; `example_lengths(dataset)` for any dataset;
- `as_lengths(values)`: lengths given by the caller (a list, array, tensor or column), checked;
- `length_stats` / `padded_tokens`: what padding random batches would cost, the speed-up packing
  can give; `recommend_max_seq_length`: a limit that covers every split.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError, check_positive_int

PERCENTILES = (10, 50, 90, 99)


def as_lengths(values) -> np.ndarray:
    """`(n,)` int64 example lengths from a list, numpy array, torch tensor or `datasets` column.

    Raises ValueError naming the first index that is not a positive int.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    elif not isinstance(values, (np.ndarray, list, tuple)) and hasattr(values, "__getitem__"):
        values = values[:]  # a `datasets` Column: one Arrow read, not a Python loop over the rows
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
    if isinstance(values, (list, tuple)) and bool in set(map(type, values)):  # np.asarray turns True into 1
        i = next(i for i, value in enumerate(values) if type(value) is bool)
        raise InputError(f"lengths[{i}]: expected a positive int, got {values[i]!r}")
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nested sequences
        raise InputError(f"lengths: expected a 1-D sequence of positive ints, got {type(values).__name__}") from error
    if array.ndim != 1:
        raise InputError(f"lengths: expected a 1-D sequence of positive ints, got an array of shape {array.shape}")
    if len(array) == 0:
        raise InputError("lengths: expected at least one example, got an empty sequence")
    if array.dtype.kind in "iu":
        pass
    elif array.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(array) | (array != np.round(array)))
        if len(bad):
            raise InputError(f"lengths[{bad[0]}]: expected a positive int, got {array[bad[0]].item()!r}")
    else:  # bool, strings, objects: only Python ints pass
        for i, value in enumerate(array.tolist()):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"lengths[{i}]: expected a positive int, got {value!r}")
    array = array.astype(np.int64)
    bad = np.flatnonzero(array < 1)
    if len(bad):
        raise InputError(f"lengths[{bad[0]}]: expected a positive int, got {array[bad[0]]}")
    return array


def column_names(rows) -> list[str]:
    """The columns of a `datasets.Dataset`, or the keys of the first row of a list of dicts."""
    if hasattr(rows, "column_names"):
        return list(rows.column_names)
    return list(rows[0].keys()) if len(rows) and isinstance(rows[0], Mapping) else []


def token_counts(rows, column: str = "input_ids", where=None) -> np.ndarray | None:
    """`(n,)` int64 tokens of each row: its `length` column, else the length of `column`; None when
    it has neither.

    `rows`: a `datasets.Dataset` (measured in Arrow, one vectorised call over the rows it shows, in
    its order, after `select`/`shuffle`/`filter`) or a list of dicts. `where(i)` names row `i` in
    errors (default `row i`; the CLI passes the file and line).

    Raises ValueError naming the row and the key for a missing key, a `length` that is not a
    positive int (a string, null, a float, a bool, -5), or ids that are not a non-empty flat list
    of ints (a string, a dict, a nested list, null).
    """
    where = where or (lambda i: f"row {i}")
    columns = column_names(rows)
    if "length" not in columns and column not in columns:
        return None
    key = "length" if "length" in columns else column
    counts = _arrow_counts(rows, key, where) if hasattr(rows, "with_format") else _row_counts(rows, key, where)
    bad = np.flatnonzero(counts < 1)
    if len(bad):
        i = int(bad[0])
        given = int(counts[i]) if key == "length" else "an empty list"
        raise InputError(f"{where(i)}: key {key!r}: expected {_EXPECTED[key == 'length']}, got {given}")
    if key == "length" and column in columns:  # the budget trusts `length`: it must be what the collator packs
        tokens = _arrow_counts(rows, column, where) if hasattr(rows, "with_format") else _row_counts(rows, column, where)
        wrong = np.flatnonzero(tokens != counts)
        if len(wrong):
            i = int(wrong[0])
            raise InputError(
                f"{where(i)}: key 'length': expected the {int(tokens[i])} tokens of its {column!r} (the token budget "
                f"counts them), got {int(counts[i])}"
            )
    return counts


_EXPECTED = {True: "a positive int", False: "a non-empty flat list of token ids (ints)"}


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:57] + '...' if len(text) > 60 else text}"


def _arrow_counts(rows, key: str, where) -> np.ndarray:
    """Counts of a `datasets.Dataset` column, from its Arrow type: integers, or lists of integers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = rows.with_format("arrow")[key]
    kind = values.type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (pa.types.is_integer(kind) if key == "length" else is_list and pa.types.is_integer(kind.value_type)):
        raise InputError(f"{where(0)}: key {key!r}: expected {_EXPECTED[key == 'length']}, got a column of {kind}")
    if values.null_count:
        i = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{where(i)}: key {key!r}: expected {_EXPECTED[key == 'length']}, got null")
    counts = values if key == "length" else pc.list_value_length(values)
    return counts.to_numpy().astype(np.int64)


def _row_counts(rows, key: str, where) -> np.ndarray:
    """Counts of a list of dicts; every row is checked (per row, and one C-level pass over the ids)."""
    try:
        values = [row[key] for row in rows]
    except (KeyError, TypeError, IndexError):
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise InputError(f"{where(i)}: expected a dict of columns, got {_describe(row)}") from None
            if key not in row:
                raise InputError(f"{where(i)}: expected key {key!r} (as in the first row), got keys {sorted(row)}") from None
        raise
    if key == "length":
        if set(map(type, values)) != {int}:
            i = next(i for i, value in enumerate(values) if type(value) is not int)
            raise InputError(f"{where(i)}: key 'length': expected a positive int, got {_describe(values[i])}")
        return np.asarray(values, dtype=np.int64)
    if set(map(type, values)) != {list}:
        i = next(i for i, value in enumerate(values) if type(value) is not list)
        raise InputError(f"{where(i)}: key {key!r}: expected {_EXPECTED[False]}, got {_describe(values[i])}")
    if set(map(type, itertools.chain.from_iterable(values))) - {int}:
        i = next(i for i, value in enumerate(values) if set(map(type, value)) - {int})
        bad = next(token for token in values[i] if type(token) is not int)
        raise InputError(f"{where(i)}: key {key!r}: expected {_EXPECTED[False]}, got {_describe(bad)} among them")
    return np.fromiter(map(len, values), dtype=np.int64, count=len(values))


def example_lengths(dataset, column: str = "input_ids") -> np.ndarray | list[int]:
    """Tokens of each example `(n,)`: the `length` column when the dataset has one, else `len(input_ids)`.

    A `datasets.Dataset` is measured in Arrow (`lengths.token_counts`), any other dataset row by row.
    """
    counts = token_counts(dataset, column) if hasattr(dataset, "column_names") else None
    return counts if counts is not None else [len(example[column]) for example in dataset]


@dataclass
class LengthStats:
    """Summary of one split's example lengths.

    Attributes:
        count, min, max: number of examples and extreme lengths.
        mean: mean length.
        percentiles: `{p: length}` for `PERCENTILES`.
        over: examples longer than the `max_seq_length` asked about (0 when none was given).
        padded_tokens, real_tokens: tokens computed with random fixed-size batches padded to their
            longest example, and tokens that are real; `padded_tokens / real_tokens` is the speed-up
            packing can give.
    """

    count: int
    min: int
    max: int
    mean: float
    percentiles: dict[int, int]
    over: int
    padded_tokens: int
    real_tokens: int

    @property
    def padding_waste(self) -> float:
        """Fraction of computed tokens that are padding."""
        return 1.0 - self.real_tokens / self.padded_tokens

    @property
    def packed_speedup(self) -> float:
        """Padded tokens per real token: the ideal speed-up of packing over padding."""
        return self.padded_tokens / self.real_tokens


def padded_tokens(lengths: np.ndarray, batch_size: int, seed: int = 0) -> int:
    """Tokens computed when `lengths` `(n,)` are shuffled into batches of `batch_size`, each padded
    to its longest example (the last batch may be smaller)."""
    check_positive_int("batch_size", batch_size)
    shuffled = np.random.default_rng(seed).permutation(np.asarray(lengths, dtype=np.int64))
    starts = np.arange(0, len(shuffled), batch_size)
    longest = np.maximum.reduceat(shuffled, starts)
    sizes = np.diff(np.append(starts, len(shuffled)))
    return int((longest * sizes).sum())


def length_stats(lengths, batch_size: int = 8, max_seq_length: int | None = None, seed: int = 0) -> LengthStats:
    """Summarise example lengths `(n,)`; see `LengthStats`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise InputError("lengths: expected at least one example, got none")
    return LengthStats(
        count=int(lengths.size),
        min=int(lengths.min()),
        max=int(lengths.max()),
        mean=float(lengths.mean()),
        percentiles={p: int(np.percentile(lengths, p, method="higher")) for p in PERCENTILES},
        over=int((lengths > max_seq_length).sum()) if max_seq_length else 0,
        padded_tokens=padded_tokens(lengths, batch_size, seed),
        real_tokens=int(lengths.sum()),
    )


def recommend_max_seq_length(
    split_lengths: dict, context_limit: int | None = None, headroom: float = 0.05, multiple: int = 64
) -> int:
    """A `max_seq_length` covering the longest example of every split, with `headroom`, rounded up
    to `multiple`, and capped at the model's `context_limit` (then the longer examples need the
    length policy: see the per-split counts)."""
    longest = max(int(np.max(lengths)) for lengths in split_lengths.values())
    recommended = int(-(-longest * (1 + headroom) // multiple) * multiple)
    return min(recommended, context_limit) if context_limit else recommended
