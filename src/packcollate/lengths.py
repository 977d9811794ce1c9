"""Length policy: what happens to a sequence longer than `max_seq_length`.

With padding-free batches, `max_seq_length` bounds each *example* (each sequence the attention keeps
apart), not the packed row: a row of many short examples may be far longer. The policy is applied
to segments (the examples, or the sub-sequences of pre-packed rows), vectorised over the whole batch.

| overflow | effect on a segment of length L > max_seq_length |
| --- | --- |
| `"truncate"` | keep its first `max_seq_length` tokens; counted and reported |
| `"split"` | cut into pieces of `max_seq_length` (the tail is its own, shorter piece); every token kept, each piece trained as an independent example |
| `"drop"` | remove it; counted and reported |
| `"error"` | raise a ValueError naming the example and its length |
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

OVERFLOW_POLICIES = ("truncate", "split", "drop", "error")


def check_length_policy(max_seq_length: int | None, overflow: str) -> None:
    """Raise ValueError for an invalid `max_seq_length` / `overflow` pair."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow: expected one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if max_seq_length is not None and (
        isinstance(max_seq_length, bool) or not isinstance(max_seq_length, (int, np.integer)) or max_seq_length < 1
    ):
        raise ValueError(f"max_seq_length: expected a positive int or None, got {max_seq_length!r}")


@dataclass
class LengthPlan:
    """The result of applying the policy to `s` segments holding `N` tokens.

    Attributes:
        keep: `(N,)` bool, the tokens that stay, or None when all stay.
        lengths: `(s',)` int64, the segment lengths afterwards.
        source: `(s',)` int64, the original segment each new segment comes from.
        truncated_segments, truncated_tokens, dropped_segments, dropped_tokens, split_segments: counts.
    """

    keep: np.ndarray | None
    lengths: np.ndarray
    source: np.ndarray
    truncated_segments: int = 0
    truncated_tokens: int = 0
    dropped_segments: int = 0
    dropped_tokens: int = 0
    split_segments: int = 0


def plan_lengths(
    lengths: np.ndarray,
    max_seq_length: int | None,
    overflow: str,
    segment_example: np.ndarray | None = None,
) -> LengthPlan:
    """Apply the length policy to segment lengths `(s,)`; see the module docstring for the policies.

    `segment_example` `(s,)` names the input example of each segment in error messages.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    identity = np.arange(len(lengths), dtype=np.int64)
    if max_seq_length is None:
        return LengthPlan(None, lengths, identity)
    over = lengths > max_seq_length
    if not over.any():
        return LengthPlan(None, lengths, identity)
    if overflow == "error":
        s = int(np.flatnonzero(over)[0])
        example = int(segment_example[s]) if segment_example is not None else s
        where = f"example {example}"
        if segment_example is not None and not np.array_equal(segment_example, identity):
            # a pre-packed row: name the sub-sequence by its index inside the row, as `seq_lengths` lists it
            where += f" (sub-sequence {s - int(np.searchsorted(segment_example, example))})"
        raise ValueError(
            f"{where}, key 'input_ids': expected at most max_seq_length={max_seq_length} tokens, got {int(lengths[s])}; "
            f"choose overflow='truncate', 'split' or 'drop' to handle long examples"
        )
    excess = int((lengths[over] - max_seq_length).sum())
    if overflow == "truncate":
        starts = np.cumsum(lengths) - lengths
        offsets = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
        return LengthPlan(
            offsets < max_seq_length,
            np.minimum(lengths, max_seq_length),
            identity,
            truncated_segments=int(over.sum()),
            truncated_tokens=excess,
        )
    if overflow == "drop":
        return LengthPlan(
            np.repeat(~over, lengths),
            lengths[~over],
            identity[~over],
            dropped_segments=int(over.sum()),
            dropped_tokens=int(lengths[over].sum()),
        )
    # split: ceil(L / max) pieces, all of max_seq_length but the last
    pieces = -(-lengths // max_seq_length)
    new_lengths = np.full(int(pieces.sum()), max_seq_length, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    new_lengths[last] = lengths - max_seq_length * (pieces - 1)
    return LengthPlan(None, new_lengths, np.repeat(identity, pieces), split_segments=int(over.sum()))


# ---------------------------------------------------------------------------------------------
# Length statistics (`packcollate stats`)
# ---------------------------------------------------------------------------------------------


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
        raise ValueError(f"{where(i)}: key {key!r}: expected {_EXPECTED[key == 'length']}, got {given}")
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
        raise ValueError(f"{where(0)}: key {key!r}: expected {_EXPECTED[key == 'length']}, got a column of {kind}")
    if values.null_count:
        i = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{where(i)}: key {key!r}: expected {_EXPECTED[key == 'length']}, got null")
    counts = values if key == "length" else pc.list_value_length(values)
    return counts.to_numpy().astype(np.int64)


def _row_counts(rows, key: str, where) -> np.ndarray:
    """Counts of a list of dicts; every row is checked (per row, and one C-level pass over the ids)."""
    try:
        values = [row[key] for row in rows]
    except (KeyError, TypeError, IndexError):
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"{where(i)}: expected a dict of columns, got {_describe(row)}") from None
            if key not in row:
                raise ValueError(f"{where(i)}: expected key {key!r} (as in the first row), got keys {sorted(row)}") from None
        raise
    if key == "length":
        if set(map(type, values)) != {int}:
            i = next(i for i, value in enumerate(values) if type(value) is not int)
            raise ValueError(f"{where(i)}: key 'length': expected a positive int, got {_describe(values[i])}")
        return np.asarray(values, dtype=np.int64)
    if set(map(type, values)) != {list}:
        i = next(i for i, value in enumerate(values) if type(value) is not list)
        raise ValueError(f"{where(i)}: key {key!r}: expected {_EXPECTED[False]}, got {_describe(values[i])}")
    if set(map(type, itertools.chain.from_iterable(values))) - {int}:
        i = next(i for i, value in enumerate(values) if set(map(type, value)) - {int})
        bad = next(token for token in values[i] if type(token) is not int)
        raise ValueError(f"{where(i)}: key {key!r}: expected {_EXPECTED[False]}, got {_describe(bad)} among them")
    return np.fromiter(map(len, values), dtype=np.int64, count=len(values))

#: Config attributes that hold a model's context length, in the order they are read
#: (`seq_length` is ChatGLM's name, `n_positions` / `n_ctx` GPT-2's).
CONTEXT_KEYS = ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length", "max_seq_len", "n_ctx")
PERCENTILES = (10, 50, 90, 99)


def _first_context_key(configs) -> tuple[int | None, str | None]:
    """The first positive int under `CONTEXT_KEYS` in `configs` (mappings), in order."""
    for cfg in configs:
        for key in CONTEXT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, key
    return None, None


def context_length(config) -> tuple[int | None, str | None]:
    """The model's context length and the config attribute it came from, or `(None, None)`.

    Reads `CONTEXT_KEYS` on the config, then on its text sub-config (multimodal configs).
    With padding-free batches, each example (not the packed row) must fit in it.
    """
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    return _first_context_key([{key: getattr(cfg, key, None) for key in CONTEXT_KEYS} for cfg in configs])


def context_length_from_json(data: dict) -> tuple[int | None, str | None]:
    """`context_length` of a config.json's data (`config_checks.read_config_json`), its `text_config`
    too, as plain values."""
    text = data.get("text_config")
    return _first_context_key([data, *([text] if isinstance(text, dict) else [])])


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
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    shuffled = np.random.default_rng(seed).permutation(np.asarray(lengths, dtype=np.int64))
    starts = np.arange(0, len(shuffled), batch_size)
    longest = np.maximum.reduceat(shuffled, starts)
    sizes = np.diff(np.append(starts, len(shuffled)))
    return int((longest * sizes).sum())


def length_stats(lengths, batch_size: int = 8, max_seq_length: int | None = None, seed: int = 0) -> LengthStats:
    """Summarise example lengths `(n,)`; see `LengthStats`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError("lengths: expected at least one example, got none")
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
