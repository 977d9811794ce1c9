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

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, is_int
from ..layout import cumulative, positions

LENGTH_POLICIES = ("truncate", "split", "drop", "error")


def check_length_policy(max_seq_length: int | None, overflow: str) -> None:
    """Raise ValueError for an invalid `max_seq_length` / `overflow` pair."""
    if overflow not in LENGTH_POLICIES:
        raise InputError(f"overflow: expected one of {LENGTH_POLICIES}, got {overflow!r}")
    if max_seq_length is not None and (not is_int(max_seq_length) or max_seq_length < 1):
        raise InputError(f"max_seq_length: expected a positive int or None, got {max_seq_length!r}")


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
        raise InputError(
            f"{where}, key 'input_ids': expected at most max_seq_length={max_seq_length} tokens, got {int(lengths[s])}; "
            f"choose overflow='truncate', 'split' or 'drop' to handle long examples"
        )
    excess = int((lengths[over] - max_seq_length).sum())
    if overflow == "truncate":
        return LengthPlan(
            positions(cumulative(lengths), lengths) < max_seq_length,
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
