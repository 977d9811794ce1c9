"""The length policy (`packcollate.collate.lengths`): `max_seq_length` bounds each example, never the packed row,
and `overflow` truncates, splits, drops or refuses a longer example (counted, announced once, named: the
example, or the sub-sequence of a pre-packed row)."""

import logging

import pytest

from packcollate import PackedCollator
from tests.helpers import (
    FEATURES,
    GOOD,
    IDS,
    IGNORE,
    raises,
    row,
    to_numpy,
    warnings_of,
)


def test_max_seq_length_bounds_each_example_not_the_row():
    """A row longer than max_seq_length is fine when every example fits."""
    collator = PackedCollator(max_seq_length=4, overflow="error")
    batch = collator(FEATURES)
    assert row(batch, "input_ids") == IDS
    assert collator.stats.truncated_sequences == collator.stats.dropped_sequences == 0


def test_overflow_truncate_keeps_the_prefix_counts_and_warns_once(caplog):
    collator = PackedCollator(max_seq_length=3)  # truncate is the default
    with caplog.at_level(logging.WARNING, logger="packcollate"):
        first = collator(FEATURES)
        collator(FEATURES)
    assert row(first, "input_ids") == [11, 12, 13, 21, 22, 31, 32, 33]
    assert row(first, "position_ids") == [0, 1, 2, 0, 1, 0, 1, 2]
    assert row(first, "labels") == [IGNORE, 12, 13, IGNORE, 22, IGNORE, 32, 33]
    assert first["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]
    assert first["max_length_q"] == 3
    assert collator.stats.truncated_sequences == 2 and collator.stats.truncated_tokens == 2
    records = warnings_of(caplog)
    assert len(records) == 1
    assert "truncated" in records[0].getMessage() and "max_seq_length=3" in records[0].getMessage()


def test_overflow_drop_removes_long_examples_counts_and_warns_once(caplog):
    collator = PackedCollator(max_seq_length=3, overflow="drop", return_seq_idx=True)
    with caplog.at_level(logging.WARNING, logger="packcollate"):
        first = collator(FEATURES)
        collator(FEATURES)
    assert row(first, "input_ids") == [11, 12, 13, 21, 22]
    assert first["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert row(first, "seq_idx") == [0, 0, 0, 1, 1]
    assert collator.stats.dropped_sequences == 2 and collator.stats.dropped_tokens == 8
    assert collator.stats.examples == 6 and collator.stats.sequences == 4
    records = warnings_of(caplog)
    assert len(records) == 1 and "dropped" in records[0].getMessage()


def test_overflow_split_keeps_every_token_in_independent_pieces(caplog):
    collator = PackedCollator(max_seq_length=2, overflow="split")
    with caplog.at_level(logging.WARNING, logger="packcollate"):
        batch = to_numpy(collator(FEATURES))
    assert row(batch, "input_ids") == IDS
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 3, 5, 7, 9]
    assert row(batch, "position_ids") == [0, 1, 0, 0, 1, 0, 1, 0, 1]
    assert row(batch, "labels") == [IGNORE, 12, IGNORE, IGNORE, 22, IGNORE, 32, IGNORE, 34]
    assert batch["max_length_q"] == 2
    assert collator.stats.split_sequences == 2 and collator.stats.sequences == 5
    assert collator.stats.truncated_tokens == collator.stats.dropped_tokens == 0
    assert warnings_of(caplog) == []  # nothing lost, nothing to report


def test_overflow_error_raises_for_a_long_example():
    with pytest.raises(ValueError, match=r"example 2.*max_seq_length=3.*got 4"):
        PackedCollator(max_seq_length=3, overflow="error")(FEATURES)


def test_length_policy_applies_after_masking():
    """Truncation keeps the labels computed on the whole example (here: the template at its start)."""
    features = [{"input_ids": [9, 1, 2, 3, 4]}]
    batch = PackedCollator(response_template=[9], max_seq_length=3)(features)
    assert row(batch, "labels") == [IGNORE, 1, 2]


def test_overflow_error():
    features = [GOOD, GOOD, {"input_ids": [1, 2, 3, 4, 5]}]
    raises(features, ValueError, "example 2", "'input_ids'", "expected at most max_seq_length=3 tokens", "got 5",
           max_seq_length=3, overflow="error")


def test_overflow_error_names_the_sub_sequence_of_a_pre_packed_row():
    features = [{"input_ids": [1, 2, 3], "seq_lengths": [1, 2]}] * 2 + [{"input_ids": [1, 2, 3, 4], "seq_lengths": [1, 3]}]
    raises(features, ValueError, "example 2 (sub-sequence 1)", "max_seq_length=2", "got 3", max_seq_length=2, overflow="error")
