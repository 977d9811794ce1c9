"""`packcollate stats` counts only what is a token count: every malformed row or option is refused
with the row (file and line) and the key, never counted as something else."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate.tools.cli import main
from packcollate.batching.lengths import length_stats, padded_tokens, token_counts

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


def test_a_negative_length_no_longer_reports_a_negative_speedup(tmp_path):
    """Today `length: -5` prints a "packed -3.00x" speed-up."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"length": 4}\n\n{"length": -5}\n')
    with pytest.raises(ValueError, match=rf"^{path}: line 3: key 'length': expected a positive int, got -5$"):
        main(["stats", str(path)])


@pytest.mark.parametrize("flag, value", [("--max-seq-length", "-5"), ("--max-seq-length", "0"), ("--batch-size", "0"),
                                         ("--batch-size", "-2")])
def test_stats_options_must_be_positive(tmp_path, flag, value):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"length": 4}) + "\n")
    with pytest.raises(ValueError, match=rf"^{flag}: expected a positive int, got {value}$"):
        main(["stats", str(path), flag, value])


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.5])
def test_padded_tokens_refuses_a_batch_size_that_is_not_positive(batch_size):
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        padded_tokens(np.array([3, 4, 5]), batch_size)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        length_stats(np.array([3, 4, 5]), batch_size)
