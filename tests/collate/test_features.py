"""Checking examples and flattening them into arrays (`packcollate.collate.features`): every container (lists,
numpy arrays, torch tensors, tuples, bools) gives the same packed row, and bad inputs fail early, with a
message that names the culprit.

The error style (einops'): the example index, the key, what was expected and what was given — never a
raw numpy / torch error from deep inside the collator. Ids numpy would wrap are refused, not wrapped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate import PackedCollator
from tests.helpers import (
    COLLATORS,
    FEATURES,
    GOOD,
    IGNORE,
    assert_batches_equal,
    raises,
    row,
)

# ---------------------------------------------------------------------------------------------
# Inputs every collator accepts
# ---------------------------------------------------------------------------------------------


def test_all_ones_attention_mask_is_accepted_and_changes_nothing():
    features = [{**f, "attention_mask": [1] * len(f["input_ids"])} for f in FEATURES]
    as_tensor = [{**f, "attention_mask": torch.ones(len(f["input_ids"]), dtype=torch.int64)} for f in FEATURES]
    expected = PackedCollator(return_seq_idx=True)(FEATURES)
    assert_batches_equal(PackedCollator(return_seq_idx=True)(features), expected)
    assert_batches_equal(PackedCollator(return_seq_idx=True)(as_tensor), expected)


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_list_numpy_and_torch_inputs_give_identical_output(return_tensors):
    features = [
        {"input_ids": [1, 2, 3], "labels": [1, IGNORE, 3], "completion_mask": [0, 1, 1], "token_type_ids": [0, 1, 1]},
        {"input_ids": [4, 5], "labels": [4, 5], "completion_mask": [1, 1], "token_type_ids": [1, 0]},
    ]
    as_numpy = [{k: np.asarray(v) for k, v in f.items()} for f in features]
    as_int32 = [{k: np.asarray(v, dtype=np.int32) for k, v in f.items()} for f in features]
    as_torch = [{k: torch.tensor(v) for k, v in f.items()} for f in features]
    mixed = [as_torch[0], features[1]]
    collator = PackedCollator(return_seq_idx=True, return_tensors=return_tensors)
    expected = collator(features)
    assert row(expected, "labels") == [IGNORE, IGNORE, 3, IGNORE, 5]
    for other in (as_numpy, as_int32, as_torch, mixed):
        assert_batches_equal(collator(other), expected)


def test_tuple_of_examples_is_accepted():
    assert_batches_equal(PackedCollator()(tuple(FEATURES)), PackedCollator()(FEATURES))


def test_bool_completion_mask_is_accepted():
    features = [{"input_ids": [1, 2, 3], "completion_mask": [False, True, True]}]
    assert row(PackedCollator()(features), "labels") == [IGNORE, 2, 3]


def test_uint64_ids_that_fit_are_exact_and_mixed_with_int64_stay_integers():
    big = 2**62 + 1  # float64 (a uint64/int64 mix) would round it
    features = [{"input_ids": np.array([big, 2], dtype=np.uint64)}, {"input_ids": np.array([3, 4], dtype=np.int64)}]
    batch = PackedCollator(return_tensors="np")(features)
    assert batch["input_ids"].dtype == np.int64 and batch["input_ids"][0].tolist() == [big, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# The batch and its keys
# ---------------------------------------------------------------------------------------------


def test_empty_batch():
    raises([], ValueError, "expected at least one example", "empty batch")


def test_not_a_list_of_dicts():
    raises({"input_ids": [1, 2]}, TypeError, "expected a list of feature dicts", "got dict")
    raises([GOOD, [1, 2, 3]], TypeError, "example 1", "expected a dict", "got list")


@pytest.mark.parametrize("empty", [[], np.array([], dtype=np.int64), np.array([]), torch.tensor([], dtype=torch.long)])
def test_example_with_zero_tokens(empty):
    raises([GOOD, GOOD, {"input_ids": empty}], ValueError, "example 2", "'input_ids'", "expected at least one token", "got 0")


def test_only_example_has_zero_tokens():
    raises([{"input_ids": []}], ValueError, "example 0", "'input_ids'", "expected at least one token", "got 0")


def test_missing_input_ids():
    raises([{"labels": [1, 2]}], KeyError, "example 0", "'input_ids'", "expected", "got keys ['labels']")


def test_examples_with_different_keys():
    raises(
        [GOOD, GOOD, {"input_ids": [1], "labels": [1]}], KeyError, "example 2", "expected the same keys", "extra ['labels']"
    )
    raises(
        [{"input_ids": [1], "labels": [1]}, GOOD], KeyError, "example 1", "expected the same keys", "lacks ['labels']"
    )
    raises([GOOD, {"labels": [1, 2, 3]}], KeyError, "example 1", "lacks ['input_ids']")


@pytest.mark.parametrize("cls", COLLATORS)
@pytest.mark.parametrize("key", ["position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "max_length_q"])
def test_a_per_token_key_named_like_an_output_is_refused(cls, key):
    features = [{"input_ids": [1, 2, 3], key: [7, 7, 7]}, {"input_ids": [4, 5], key: [7, 7]}]
    with pytest.raises(ValueError, match=rf"example 0, key '{key}': expected no '{key}' in the examples \(the collator computes it"):
        cls(return_seq_idx=True)(features) if cls is PackedCollator else cls()(features)


# ---------------------------------------------------------------------------------------------
# Per-token keys of the wrong length
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["labels", "completion_mask", "assistant_masks", "attention_mask", "token_type_ids"])
@pytest.mark.parametrize("given", [2, 4, 0])
def test_per_token_key_length_differs_from_input_ids(key, given):
    fill = 1  # valid for every key, so that only the length is wrong
    features = [{"input_ids": [1, 2, 3], key: [fill] * 3} for _ in range(2)]
    features.append({"input_ids": [1, 2, 3], key: [fill] * given})
    raises(features, ValueError, "example 2", f"'{key}'", "expected 3 values", f"got {given}")


# ---------------------------------------------------------------------------------------------
# Malformed token ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, given",
    [
        ([1.0, 2.0], "got float 1.0"),
        (np.array([1.0, 2.0]), "got float 1.0"),
        (torch.tensor([1.0, 2.0]), "got float 1.0"),
        ([1, 2.5], "got float 2.5"),
        ([True, False], "got bool True"),
        (np.array([True, False]), "got bool True"),
        (torch.tensor([True, False]), "got bool True"),
        ("abc", "got str 'abc'"),
        (["a", "b"], "got str 'a'"),
        ([[1, 2], [3, 4]], "got a nested sequence of shape (2, 2)"),
        (torch.tensor([[1, 2]]), "got a nested sequence of shape (1, 2)"),
        ([[1, 2], [3]], "got a ragged nested sequence"),
        (5, "got int 5"),
        (None, "got NoneType None"),
    ],
    ids=[
        "float-list", "float-numpy", "float-torch", "int-and-float", "bool-list", "bool-numpy", "bool-torch",
        "string", "strings", "nested", "nested-torch", "ragged", "scalar", "none",
    ],
)
def test_malformed_input_ids(bad, given):
    raises([GOOD, GOOD, {"input_ids": bad}], ValueError, "example 2", "'input_ids'", "expected a flat sequence of integers", given)


def test_negative_token_id():
    raises(
        [GOOD, GOOD, {"input_ids": [4, -2, 1]}], ValueError, "example 2", "'input_ids'", "expected non-negative", "got -2 at position 1"
    )


def test_malformed_labels():
    features = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [1, 2], "labels": [1, 2]}]
    raises([*features, {"input_ids": [1, 2], "labels": [1.5, 2]}], ValueError, "example 2", "'labels'", "expected", "got float 1.5")
    raises([*features, {"input_ids": [1, 2], "labels": [True, False]}], ValueError, "example 2", "'labels'", "got bool True")


def test_malformed_extra_key():
    features = [{"input_ids": [1, 2], "token_type_ids": [0, 1]}] * 2
    raises([*features, {"input_ids": [1, 2], "token_type_ids": [[0], [1]]}], ValueError, "example 2", "'token_type_ids'", "nested")


def test_non_numeric_extra_per_token_key():
    """The given value is described once: `got list ['a', 'b']`."""
    features = [{"input_ids": [1, 2], "w": [0.5, 1.0]}, {"input_ids": [1, 2], "w": ["a", "b"]}]
    message = raises(features, ValueError, "example 1", "'w'", "expected a flat sequence of numbers")
    assert message.endswith("got list ['a', 'b']"), message


@settings(max_examples=40, deadline=None)
@given(
    big=st.integers(2**63, 2**64 - 1),
    position=st.integers(0, 3),
    example=st.integers(0, 2),
    key=st.sampled_from(["input_ids", "labels"]),
    as_list=st.booleans(),
)
def test_uint64_ids_above_2_63_are_refused_not_wrapped(big, position, example, key, as_list):
    features = []
    for i in range(3):
        ids = np.arange(1, 5, dtype=np.uint64)
        values = ids.copy()
        if i == example:
            values[position] = big
        row = {"input_ids": ids, "labels": ids.copy()}
        row[key] = values.tolist() if as_list else values
        features.append(row)
    with pytest.raises(ValueError, match=rf"example {example}, key '{key}': expected integers below 2\*\*63, got {big} at position {position}"):
        PackedCollator()(features)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["completion_mask", "assistant_masks"])
@pytest.mark.parametrize("value, given", [(2, "got 2"), (-1, "got -1"), (0.5, "got float 0.5")])
def test_mask_values_not_0_or_1(key, value, given):
    features = [{"input_ids": [1, 2], key: [0, 1]}] * 2 + [{"input_ids": [1, 2], key: [1, value]}]
    raises(features, ValueError, "example 2", f"'{key}'", "expected", "0/1", given)


def test_attention_mask_with_zeros():
    """A padded example (attention_mask with zeros) is refused: examples are concatenated, not padded."""
    features = [{"input_ids": [1, 2], "attention_mask": [1, 1]}] * 2 + [{"input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}]
    raises(features, ValueError, "example 2", "'attention_mask'", "expected all ones", "got 1 zeros")


# ---------------------------------------------------------------------------------------------
# Pre-packed rows
# ---------------------------------------------------------------------------------------------


def prepacked(last_seq_lengths):
    return [{"input_ids": [1, 2, 3], "seq_lengths": [1, 2]}] * 2 + [{"input_ids": [1, 2, 3], "seq_lengths": last_seq_lengths}]


def test_seq_lengths_not_summing_to_the_row_length():
    raises(prepacked([1, 1]), ValueError, "example 2", "'seq_lengths'", "expected lengths summing to the row length 3", "got [1, 1]")
    raises(prepacked([2, 2]), ValueError, "example 2", "'seq_lengths'", "summing to the row length 3", "(sum 4)")


@pytest.mark.parametrize("bad, given", [([0, 3], "got 0"), ([4, -1], "got -1")])
def test_seq_lengths_zero_or_negative(bad, given):
    raises(prepacked(bad), ValueError, "example 2", "'seq_lengths'", "expected positive lengths", given)


def test_seq_lengths_empty():
    raises(prepacked([]), ValueError, "example 2", "'seq_lengths'", "expected at least one sub-sequence length", "got none")


def test_seq_lengths_not_integers():
    raises(prepacked([1.5, 1.5]), ValueError, "example 2", "'seq_lengths'", "expected", "got float 1.5")


# ---------------------------------------------------------------------------------------------
# Per-example keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, given", [(7, "got int 7"), ("text", "got str 'text'"), (np.int64(3), "got int64 3")])
def test_per_example_scalar_key_not_in_passthrough_keys(value, given):
    message = raises([{"input_ids": [1, 2], "idx": value}], ValueError, "example 0", "'idx'", "expected a per-token sequence", given)
    assert "passthrough_keys" in message  # says how to fix it


def test_errors_name_the_first_bad_example_not_a_later_one():
    features = [GOOD, {"input_ids": [1, -1]}, {"input_ids": [-5]}]
    raises(features, ValueError, "example 1", "got -1 at position 1")


@pytest.mark.parametrize("label", [-1, -2, -101])
def test_a_label_that_is_neither_a_token_nor_ignored_is_refused(label):
    """[17] H3: a label -1 used to pass through and train as token 0; labels are token ids or -100."""
    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE, label]}]
    raises(features, ValueError, "example 1, key 'labels'", f"got {label} at position 1")
