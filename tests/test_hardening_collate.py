"""The collators refuse options and keys that would silently replace what they compute, ids numpy
would wrap, and count every batch when called from several threads."""

from __future__ import annotations

import copy
import pickle
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate import PackedCollator, PaddedCollator

COLLATORS = [PackedCollator, PaddedCollator]
OUTPUT_KEYS = ["input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
               "max_length_k", "seq_idx", "completion_mask", "assistant_masks", "attention_mask", "seq_lengths"]


def examples(n=3):
    return [{"input_ids": list(range(1, 3 + i)), "completion_mask": [0] + [1] * (1 + i)} for i in range(n)]


@pytest.mark.parametrize("cls", COLLATORS)
@pytest.mark.parametrize("key", OUTPUT_KEYS)
def test_passthrough_keys_naming_an_output_key_are_refused(cls, key):
    with pytest.raises(ValueError, match=rf"passthrough_keys: expected keys the collator neither reads nor emits, got \['{key}'\]"):
        cls(passthrough_keys=[key])


def test_passthrough_keys_as_a_string_is_refused():
    with pytest.raises(ValueError, match="passthrough_keys: expected a list of key names, got the string 'idx'"):
        PackedCollator(passthrough_keys="idx")


def test_passthrough_of_labels_no_longer_trains_on_prompts():
    """Today `passthrough_keys=['labels']` returns the raw labels: no -100 separators, prompts trained on."""
    with pytest.raises(ValueError):
        PackedCollator(passthrough_keys=["labels"])
    batch = PackedCollator()(examples())
    assert (batch["labels"][0, batch["cu_seq_lens_q"][:-1].long()] == -100).all()


@pytest.mark.parametrize("cls", COLLATORS)
@pytest.mark.parametrize("key", ["position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "max_length_q"])
def test_a_per_token_key_named_like_an_output_is_refused(cls, key):
    features = [{"input_ids": [1, 2, 3], key: [7, 7, 7]}, {"input_ids": [4, 5], key: [7, 7]}]
    with pytest.raises(ValueError, match=rf"example 0, key '{key}': expected no '{key}' in the examples \(the collator computes it"):
        cls(return_seq_idx=True)(features) if cls is PackedCollator else cls()(features)


@pytest.mark.parametrize("value", [-3, -1, True, 1.5, "2"])
def test_position_ids_start_must_be_a_non_negative_int(value):
    with pytest.raises(ValueError, match=rf"position_ids_start: expected a non-negative int, got {value!r}"):
        PackedCollator(position_ids_start=value)


@pytest.mark.parametrize("cls", COLLATORS)
@pytest.mark.parametrize("value", [-1, -100, False, 0.0])
def test_pad_token_id_must_be_a_non_negative_int(cls, value):
    with pytest.raises(ValueError, match=rf"pad_token_id: expected a non-negative int, got {value!r}"):
        cls(pad_token_id=value)


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


def test_uint64_ids_that_fit_are_exact_and_mixed_with_int64_stay_integers():
    big = 2**62 + 1  # float64 (a uint64/int64 mix) would round it
    features = [{"input_ids": np.array([big, 2], dtype=np.uint64)}, {"input_ids": np.array([3, 4], dtype=np.int64)}]
    batch = PackedCollator(return_tensors="np")(features)
    assert batch["input_ids"].dtype == np.int64 and batch["input_ids"][0].tolist() == [big, 2, 3, 4]


def test_collator_stats_count_every_batch_under_threads():
    """Without a lock `stats.tokens += int(...)` loses about 1 update in 12 here (16 threads)."""
    collator = PackedCollator(max_seq_length=3)
    features = examples(4)  # lengths 2, 3, 4, 5: two truncated, 3 tokens removed
    per_batch = collator(features)["input_ids"].shape[1]
    collator.stats.reset()
    threads, calls = 16, 500
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: lost updates show at once
    try:
        workers = [threading.Thread(target=lambda: [collator(features) for _ in range(calls)]) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(previous)
    n = threads * calls
    stats = collator.stats
    assert (stats.batches, stats.examples, stats.tokens) == (n, 4 * n, per_batch * n)
    assert (stats.truncated_sequences, stats.truncated_tokens) == (2 * n, 3 * n)


def test_collators_with_stats_still_pickle_and_copy():
    collator = PackedCollator()
    collator(examples())
    for clone in (pickle.loads(pickle.dumps(collator)), copy.deepcopy(collator)):
        assert clone.stats.batches == 1
        clone(examples())
        assert clone.stats.batches == 2 and collator.stats.batches == 1
