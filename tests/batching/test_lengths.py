"""Example lengths (`packcollate.batching.lengths`): the lengths a token budget plans from, read from any container
and checked (`lengths[i]` named), counted from rows or Arrow columns (every malformed row or column refused
with the row and the key, never counted as something else), and their statistics (padded tokens, the
recommended `max_seq_length`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate.batching.lengths import (
    length_stats,
    padded_tokens,
    recommend_max_seq_length,
    token_counts,
)
from packcollate.batching.sampler import TokenBudgetBatchSampler
from tests.helpers import flan_like

# ---------------------------------------------------------------------------------------------
# lengths given to the sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths, message",
    [
        ([3, 0, 4], r"lengths\[1\]: expected a positive int, got 0"),
        ([3, 4, -2], r"lengths\[2\]: expected a positive int, got -2"),
        ([3.0, 2.5], r"lengths\[1\]: expected a positive int, got 2.5"),
        ([3, None], r"lengths\[1\]: expected a positive int, got None"),
        (["3"], r"lengths\[0\]: expected a positive int, got '3'"),
        (np.array([True, False]), r"lengths\[0\]: expected a positive int, got True"),
        (np.array([1.0, np.nan]), r"lengths\[1\]: expected a positive int, got nan"),
        ([[1, 2], [3, 4]], r"expected a 1-D sequence of positive ints, got an array of shape \(2, 2\)"),
        ([], "expected at least one example, got an empty sequence"),
    ],
)
def test_bad_lengths(lengths, message):
    with pytest.raises(ValueError, match=message):
        TokenBudgetBatchSampler(lengths, 100)


@pytest.mark.parametrize("lengths, index", [([3, True], 1), ([False, 4], 0), ((2, 3, True), 2)])
def test_bool_lengths_are_refused(lengths, index):
    with pytest.raises(ValueError, match=rf"lengths\[{index}\]: expected a positive int, got (True|False)"):
        TokenBudgetBatchSampler(lengths, 10)


def test_length_containers_agree():
    datasets = pytest.importorskip("datasets")
    lengths = flan_like(1000)
    expected = list(TokenBudgetBatchSampler(lengths.tolist(), 2048))
    dataset = datasets.Dataset.from_dict({"length": lengths})
    for source in (lengths, torch.from_numpy(lengths), dataset["length"], dataset.with_format("torch")["length"]):
        assert list(TokenBudgetBatchSampler(source, 2048)) == expected


# ---------------------------------------------------------------------------------------------
# token counts of rows and Arrow columns
# ---------------------------------------------------------------------------------------------


BAD_IDS = [("hello world", "str"), ([[1, 2, 3], [4, 5]], "list"), ({"a": 1, "b": 2}, "dict"), (None, "NoneType"),
           (7, "int"), ([1, 2.5], "float"), ([1, True], "bool"), ([], "an empty list")]
BAD_LENGTHS = [(-5, "-5"), (0, "0"), (2.7, "float"), (2.0, "float"), (True, "bool"), (None, "NoneType"), ("12", "str")]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=12),
    data=st.data(),
    key=st.sampled_from(["input_ids", "length"]),
)
def test_token_counts_refuse_every_malformed_row(lengths, data, key):
    rows = [{"input_ids": list(range(n))} if key == "input_ids" else {"length": n} for n in lengths]
    assert token_counts(rows).tolist() == lengths
    bad_row = data.draw(st.integers(0, len(rows) - 1))
    value, given_text = data.draw(st.sampled_from(BAD_IDS if key == "input_ids" else BAD_LENGTHS))
    rows[bad_row] = {key: value}
    with pytest.raises(ValueError, match=rf"^line {bad_row + 3}: key '{key}': expected .*got .*{given_text}"):
        token_counts(rows, where=lambda i: f"line {i + 3}")


def test_a_row_without_the_key_is_named():
    with pytest.raises(ValueError, match=r"^row 1: expected key 'input_ids' \(as in the first row\), got keys \['text'\]"):
        token_counts([{"input_ids": [1]}, {"text": "a"}])


@pytest.mark.parametrize("column, values, kind", [
    ("input_ids", [[[1, 2, 3], [4, 5]]], "list<item: list<item: int(32|64)>>"),
    ("input_ids", ["hello world"], "string"),
    ("length", [2.7], "double"),
    ("length", ["12"], "string"),
])
def test_arrow_columns_of_the_wrong_type_are_refused(column, values, kind):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({column: values})
    with pytest.raises(ValueError, match=rf"row 0: key '{column}': expected .*got a column of {kind}"):
        token_counts(dataset)


def test_arrow_nulls_and_negative_lengths_are_refused():
    datasets = pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="row 1: key 'length': expected a positive int, got null"):
        token_counts(datasets.Dataset.from_dict({"length": [3, None]}))
    with pytest.raises(ValueError, match="row 0: key 'length': expected a positive int, got -5"):
        token_counts(datasets.Dataset.from_dict({"length": [-5, 3]}))


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def test_padded_tokens_matches_a_plain_computation():
    lengths = np.random.default_rng(0).integers(1, 100, 37)
    shuffled = np.random.default_rng(3).permutation(lengths)
    expected = sum(max(shuffled[i : i + 8]) * len(shuffled[i : i + 8]) for i in range(0, 37, 8))
    assert padded_tokens(lengths, 8, seed=3) == expected


def test_length_stats():
    stats = length_stats([10, 20, 30, 400], batch_size=4, max_seq_length=25)
    assert (stats.count, stats.min, stats.max, stats.over) == (4, 10, 400, 2)
    assert stats.real_tokens == 460 and stats.padded_tokens == 1600
    assert stats.packed_speedup == pytest.approx(1600 / 460)
    assert stats.padding_waste == pytest.approx(1 - 460 / 1600)


def test_recommendation_covers_every_split_and_respects_the_context():
    splits = {"train": np.array([100, 200]), "validation": np.array([50, 700])}
    assert recommend_max_seq_length(splits) == 768  # 700 * 1.05 -> 735, next multiple of 64
    assert recommend_max_seq_length(splits, context_limit=512) == 512


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.5])
def test_padded_tokens_refuses_a_batch_size_that_is_not_positive(batch_size):
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        padded_tokens(np.array([3, 4, 5]), batch_size)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        length_stats(np.array([3, 4, 5]), batch_size)


@pytest.mark.parametrize("as_dataset", [True, False])
def test_a_length_column_that_lies_is_refused(as_dataset):
    """[17] H4: a `length` of 1 on 100-token rows made a 4,000-token batch under a 200-token budget
    (map-style: PackedTrainer's budget plans from this column)."""
    rows = {"input_ids": [[1] * 100] * 40, "length": [100] * 39 + [1]}
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict(rows) if as_dataset else [{"input_ids": i, "length": n}
                                                               for i, n in zip(rows["input_ids"], rows["length"])]
    with pytest.raises(ValueError, match="row 39: key 'length': expected the 100 tokens of its 'input_ids' .*got 1"):
        token_counts(data)
    assert token_counts(datasets.Dataset.from_dict({"input_ids": [[1] * 3], "length": [3]})).tolist() == [3]
