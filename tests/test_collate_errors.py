"""Bad inputs and bad options fail early, with a message that names the culprit.

The error style (einops'): the example index, the key, what was expected and what was given — never a
raw numpy / torch error from deep inside the collator.
"""

import re

import numpy as np
import pytest
import torch

from packcollate import PackedCollator, PaddedCollator

GOOD = {"input_ids": [1, 2, 3]}


def raises(features, error, *fragments, collator=None, **options):
    """Call the collator(s) on `features`; assert `error` and that the message holds every fragment.

    Both collators validate the same way, so both are checked (unless a specific collator is given).
    """
    collators = [collator] if collator is not None else [PackedCollator(**options), PaddedCollator(**options)]
    messages = []
    for c in collators:
        with pytest.raises(error) as info:
            c(features)
        message = str(info.value.args[0]) if info.value.args else str(info.value)
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        # ours, not a numpy/torch error surfacing from inside: it starts by naming the example (or batch)
        assert re.match(r"(example \d+|every example|expected)", message), message
        messages.append(message)
    return messages[0]


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


# ---------------------------------------------------------------------------------------------
# Length policy and templates, at call time
# ---------------------------------------------------------------------------------------------


def test_overflow_error():
    features = [GOOD, GOOD, {"input_ids": [1, 2, 3, 4, 5]}]
    raises(features, ValueError, "example 2", "'input_ids'", "expected at most max_seq_length=3 tokens", "got 5",
           max_seq_length=3, overflow="error")


def test_overflow_error_names_the_sub_sequence_of_a_pre_packed_row():
    features = [{"input_ids": [1, 2, 3], "seq_lengths": [1, 2]}] * 2 + [{"input_ids": [1, 2, 3, 4], "seq_lengths": [1, 3]}]
    raises(features, ValueError, "example 2 (sub-sequence 1)", "max_seq_length=2", "got 3", max_seq_length=2, overflow="error")


def test_overflow_drop_removing_every_example_gives_a_batch_without_targets(caplog):
    """Not an error (it stopped evaluation mid-run): one pad token, no target, announced once."""
    features = [{"input_ids": [1, 2, 3], "idx": 7}]
    for collator in (PackedCollator(max_seq_length=2, overflow="drop", pad_token_id=5, passthrough_keys=["idx"]),
                     PaddedCollator(max_seq_length=2, overflow="drop", pad_token_id=5, passthrough_keys=["idx"])):
        with caplog.at_level("WARNING", logger="packcollate"):
            batch = collator(features)
        assert batch["input_ids"].tolist() == [[5]] and batch["labels"].tolist() == [[-100]]
        assert collator.stats.dropped_sequences == 1 and collator.stats.sequences == 0
        assert "overflow='drop' removed every example of a batch (lengths [3])" in caplog.text
    packed = PackedCollator(max_seq_length=2, overflow="drop")([{"input_ids": [1, 2, 3]}])
    assert packed["cu_seq_lens_q"].tolist() == [0, 1] and packed["position_ids"].tolist() == [[0]]


def test_on_missing_template_error():
    features = [{"input_ids": [9, 1]}, {"input_ids": [9, 2]}, {"input_ids": [1, 2]}]
    raises(features, ValueError, "example 2", "expected the response_template [9]", "got 1 of 3",
           response_template=[9], on_missing_template="error")


# ---------------------------------------------------------------------------------------------
# Invalid options: refused when the collator is built
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PackedCollator, PaddedCollator])
@pytest.mark.parametrize(
    "options, fragments",
    [
        ({"overflow": "cut"}, ("overflow:", "expected one of", "got 'cut'")),
        ({"return_tensors": "tf"}, ("return_tensors:", "expected one of", "got 'tf'")),
        ({"max_seq_length": 0}, ("max_seq_length:", "expected a positive int", "got 0")),
        ({"max_seq_length": -3}, ("max_seq_length:", "expected a positive int", "got -3")),
        ({"max_seq_length": 2.5}, ("max_seq_length:", "expected a positive int", "got 2.5")),
        ({"max_seq_length": True}, ("max_seq_length:", "got True")),
        ({"pad_to_multiple_of": 0}, ("pad_to_multiple_of:", "expected a positive int", "got 0")),
        ({"pad_to_multiple_of": -8}, ("pad_to_multiple_of:", "expected a positive int", "got -8")),
        ({"on_missing_template": "skip"}, ("on_missing_template:", "expected one of", "got 'skip'")),
        ({"instruction_template": [1]}, ("instruction_template:", "expected a response_template too")),
        ({"response_template": "### Answer:"}, ("response_template:", "expected token ids", "got the string '### Answer:'")),
        ({"response_template": [1], "instruction_template": "### User:"}, ("instruction_template:", "got the string")),
        ({"response_template": []}, ("response_template:", "expected a non-empty flat sequence", "got []")),
        ({"response_template": [1.5]}, ("response_template:", "expected a non-empty flat sequence", "got [1.5]")),
        ({"response_template": [[1, 2]]}, ("response_template:", "expected a non-empty flat sequence")),
    ],
)
def test_invalid_option(cls, options, fragments):
    with pytest.raises(ValueError) as info:
        cls(**options)
    message = str(info.value)
    option = fragments[0]
    assert message.startswith(option), message  # names the option first
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_invalid_return_tensors_per_call():
    with pytest.raises(ValueError, match=r"^return_tensors: expected one of .*got 'tf'"):
        PackedCollator()([GOOD], return_tensors="tf")


def test_errors_name_the_first_bad_example_not_a_later_one():
    features = [GOOD, {"input_ids": [1, -1]}, {"input_ids": [-5]}]
    raises(features, ValueError, "example 1", "got -1 at position 1")
