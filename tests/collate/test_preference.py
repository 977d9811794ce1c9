"""`PackedPreferenceCollator` (`packcollate.collate.preference`): chosen and rejected of every pair packed into one
row, truncated exactly as TRL's padded `DataCollatorForPreference` truncates them; a missing key is named."""

import pytest

trl = pytest.importorskip("trl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import packcollate  # noqa: E402,F401
from packcollate.collate.preference import PackedPreferenceCollator  # noqa: E402


def test_collator_matches_trl_truncation():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
                {"prompt_ids": [11], "chosen_ids": [12, 13, 14, 15], "rejected_ids": [16, 17]}]
    for mode in ("keep_start", "keep_end"):
        padded = DataCollatorForPreference(pad_token_id=0, max_length=4, truncation_mode=mode)(examples)
        packed = PackedPreferenceCollator(max_length=4, truncation_mode=mode)(examples)
        mask = padded["attention_mask"].bool()
        assert torch.equal(packed["input_ids"][0], padded["input_ids"][mask])
        assert torch.equal(packed["completion_mask"][0], padded["completion_mask"][mask])
        assert packed["cu_seq_lens_q"].tolist() == [0, *mask.sum(1).cumsum(0).tolist()]
    with pytest.raises(KeyError, match="example 1: expected a key 'chosen_ids'"):
        PackedPreferenceCollator()([examples[0], {"prompt_ids": [1], "rejected_ids": [2]}])


PAIR = {"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]}


@pytest.mark.parametrize("bad, message", [
    ({"chosen_ids": [7, -3]}, "example 1, key 'chosen_ids': expected token ids in \\[0, 2\\*\\*63\\), got -3 at position 1"),
    ({"rejected_ids": np.array([2**64 - 1], dtype=np.uint64)}, "key 'rejected_ids': expected token ids in .*18446744073709551615"),
    ({"prompt_ids": torch.tensor([4, -1])}, "example 1, key 'prompt_ids'.*got -1 at position 1"),
])
def test_preference_pairs_refuse_negative_and_wrapping_ids(bad, message):
    """[17]: negative ids, and uint64 ids above 2**63 (wrapped to negative by int64), used to pass."""
    from packcollate.collate.preference import PackedPairCollator

    with pytest.raises(ValueError, match=message):
        PackedPreferenceCollator()([PAIR, {**PAIR, **bad}])
    if "prompt_ids" not in bad:
        with pytest.raises(ValueError, match=message):
            PackedPairCollator()([PAIR, {**PAIR, **bad}])


@pytest.mark.parametrize("key", ["ref_chosen_logps", "ref_rejected_logps"])
@pytest.mark.parametrize("value, message", [
    (None, "expected a finite number, got NoneType"),
    ("-1.5", "expected a finite number, got str"),
    (float("nan"), "expected a finite number .*got nan"),
    (float("-inf"), "expected a finite number .*got -inf"),
])
def test_reference_logprobs_are_finite_numbers(key, value, message):
    """[17]: string log-probs raised deep in torch; None, NaN and inf gave a NaN loss."""
    with pytest.raises(ValueError, match=f"example 1, key '{key}': {message}"):
        PackedPreferenceCollator()([{**PAIR, key: -1.0}, {**PAIR, key: value}])


@pytest.mark.parametrize("value, message", [
    (None, "expected a finite number, got NoneType"),
    (float("inf"), "expected a finite number .*got inf"),
    ("0.5", "expected a finite number, got str"),
])
def test_reward_margins_are_finite_numbers(value, message):
    from packcollate.collate.preference import PackedPairCollator

    pair = {"chosen_ids": [1, 2], "rejected_ids": [3]}
    with pytest.raises(ValueError, match=f"example 1, key 'margin': {message}"):
        PackedPairCollator()([{**pair, "margin": 0.5}, {**pair, "margin": value}])


def test_a_margin_in_only_some_pairs_is_refused():
    """[17]: a margin in example 1 but not in example 0 was silently dropped for the whole batch."""
    from packcollate.collate.preference import PackedPairCollator

    pair = {"chosen_ids": [1, 2], "rejected_ids": [3]}
    with pytest.raises(KeyError, match="example 0: expected a key 'margin' \\(example 1 has one"):
        PackedPairCollator()([pair, {**pair, "margin": 1.0}])
    assert PackedPairCollator()([{**pair, "margin": 1.0}, {**pair, "margin": 2}])["margin"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("key", ["input_ids", "attention_mask"])
def test_reward_pairs_refuse_keys_they_would_ignore(key):
    from packcollate.collate.preference import PackedPairCollator

    pair = {"chosen_ids": [1, 2], "rejected_ids": [3]}
    with pytest.raises(ValueError, match=f"example 1: expected a pair of 'chosen_ids' and 'rejected_ids', got also \\['{key}'\\]"):
        PackedPairCollator()([pair, {**pair, key: [1, 1]}])


@pytest.mark.parametrize("max_length", [True, 0, -2, 2.5, "8"])
def test_max_length_is_a_positive_int(max_length):
    with pytest.raises(ValueError, match="max_length: expected a positive int or None"):
        PackedPreferenceCollator(max_length=max_length)
