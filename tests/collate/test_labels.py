"""Completion-only labels (`packcollate.collate.labels`): given labels, `completion_mask` / `assistant_masks`,
response and instruction templates, searched per example and per sub-sequence of a pre-packed row, never
across two examples.

Each test reads its expected labels off a small hand-written batch (the packed row's `labels`).
"""

import logging

import pytest

from packcollate import PackedCollator
from tests.helpers import FEATURES, IDS, IGNORE, row, warnings_of


def test_labels_absent_are_a_copy_of_input_ids():
    batch = PackedCollator()(FEATURES)
    labels = row(batch, "labels")
    assert labels[1:3] == IDS[1:3] and labels[6:] == IDS[6:]
    # a copy, not a view: writing labels leaves input_ids
    batch["labels"][0, 1] = 0
    assert row(batch, "input_ids") == IDS


def test_labels_given_are_used_and_their_first_token_masked():
    features = [
        {"input_ids": [1, 2, 3], "labels": [7, 8, IGNORE]},
        {"input_ids": [4, 5], "labels": [9, 10]},
    ]
    batch = PackedCollator()(features)
    assert row(batch, "labels") == [IGNORE, 8, IGNORE, IGNORE, 10]
    assert row(batch, "input_ids") == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("key", ["completion_mask", "assistant_masks"])
def test_mask_key_masks_prompt_tokens_and_is_not_emitted(key):
    """A 0 in completion_mask / assistant_masks means "not trained on": label -100."""
    features = [
        {"input_ids": [1, 2, 3, 4], key: [0, 0, 1, 1]},
        {"input_ids": [5, 6, 7], key: [0, 1, 0]},
    ]
    batch = PackedCollator()(features)
    assert row(batch, "labels") == [IGNORE, IGNORE, 3, 4, IGNORE, 6, IGNORE]
    assert key not in batch


def test_completion_mask_and_assistant_masks_combine_with_and():
    features = [{"input_ids": [1, 2, 3, 4, 5], "completion_mask": [1, 1, 1, 0, 1], "assistant_masks": [1, 0, 1, 1, 1]}]
    batch = PackedCollator()(features)
    assert row(batch, "labels") == [IGNORE, IGNORE, 3, IGNORE, 5]


def test_completion_mask_applies_on_top_of_given_labels():
    features = [{"input_ids": [1, 2, 3, 4], "labels": [10, 20, IGNORE, 40], "completion_mask": [1, 0, 1, 1]}]
    batch = PackedCollator()(features)
    assert row(batch, "labels") == [IGNORE, IGNORE, IGNORE, 40]


@pytest.mark.parametrize("key", ["completion_mask", "assistant_masks"])
def test_completion_only_loss_false_ignores_masks(key):
    """completion_only_loss=False: every token trained on (but the first), mask keys dropped."""
    features = [{"input_ids": [1, 2, 3, 4], key: [0, 0, 0, 1]}, {"input_ids": [5, 6], key: [0, 0]}]
    batch = PackedCollator(completion_only_loss=False)(features)
    assert row(batch, "labels") == [IGNORE, 2, 3, 4, IGNORE, 6]
    assert key not in batch


def test_completion_only_loss_false_ignores_response_template():
    features = [{"input_ids": [1, 9, 2, 3]}]
    batch = PackedCollator(response_template=[9], completion_only_loss=False)(features)
    assert row(batch, "labels") == [IGNORE, 9, 2, 3]


def test_response_template_masks_up_to_and_including_its_first_occurrence():
    features = [{"input_ids": [1, 7, 8, 2, 7, 8, 3]}, {"input_ids": [7, 8, 4]}]
    batch = PackedCollator(response_template=[7, 8])(features)
    assert row(batch, "labels") == [IGNORE, IGNORE, IGNORE, 2, 7, 8, 3, IGNORE, IGNORE, 4]


def test_instruction_template_masks_every_user_turn():
    """Multi-turn: from each instruction template to the end of the next response template is masked."""
    ids = [5, 1, 7, 8, 2, 3, 5, 4, 7, 8, 6]
    #      U  u  R  R  a  a  U  u  R  R  a
    batch = PackedCollator(response_template=[7, 8], instruction_template=[5])([{"input_ids": ids}])
    assert row(batch, "labels") == [IGNORE, IGNORE, IGNORE, IGNORE, 2, 3, IGNORE, IGNORE, IGNORE, IGNORE, 6]


def test_response_template_never_matches_across_two_examples():
    """A template split over the boundary of two examples is not a match (both examples are missing it)."""
    collator = PackedCollator(response_template=[7, 8])
    batch = collator([{"input_ids": [1, 7]}, {"input_ids": [8, 2]}])
    assert row(batch, "labels") == [IGNORE] * 4
    assert collator.stats.missing_template == 2


def test_missing_template_masks_the_example_counts_and_warns_once(caplog):
    collator = PackedCollator(response_template=[9])
    with caplog.at_level(logging.WARNING, logger="packcollate"):
        for _ in range(2):
            batch = collator([{"input_ids": [1, 9, 2]}, {"input_ids": [3, 4, 5]}])
    assert row(batch, "labels") == [IGNORE, IGNORE, 2, IGNORE, IGNORE, IGNORE]
    assert collator.stats.missing_template == 2
    records = warnings_of(caplog)
    assert len(records) == 1
    assert "response_template" in records[0].getMessage()


def test_seq_lengths_bound_the_response_template_search():
    """Templates are searched per sub-sequence, like per example."""
    features = [{"input_ids": [9, 1, 2, 9, 3], "seq_lengths": [3, 2]}]
    batch = PackedCollator(response_template=[9])(features)
    assert row(batch, "labels") == [IGNORE, 1, 2, IGNORE, 3]
