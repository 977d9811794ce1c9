"""`PackedPreferenceCollator` (`packcollate.collate.preference`): chosen and rejected of every pair packed into one
row, truncated exactly as TRL's padded `DataCollatorForPreference` truncates them; a missing key is named."""

import pytest

trl = pytest.importorskip("trl")

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
