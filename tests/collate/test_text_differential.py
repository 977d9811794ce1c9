"""Differential tests of `PackedCollator` (`packcollate.collate.text`): it gives exactly what the reference
collators give.

References: transformers' `DataCollatorWithFlattening` and TRL's padding-free
`DataCollatorForLanguageModeling`. Both build the packed row with per-token Python; ours is vectorised.
On random batches the outputs must agree key for key: same keys, same types, same dtypes, same values.
"""

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithFlattening

from packcollate import PackedCollator

trl_sft = pytest.importorskip("trl.trainer.sft_trainer")

IGNORE = -100
SEEDS = range(200)


def random_features(seed: int, *, labels: bool = False, prepacked: bool = False, container: str = "list") -> list[dict]:
    """A random batch: 1-12 examples of 1-40 tokens (long-tailed), optional labels / seq_lengths."""
    rng = np.random.default_rng(seed)
    features = []
    for _ in range(rng.integers(1, 13)):
        n = int(min(40, rng.lognormal(2, 1) + 1))
        ex = {"input_ids": rng.integers(0, 32000, n)}
        if labels:
            ex["labels"] = np.where(rng.random(n) < 0.3, IGNORE, rng.integers(0, 32000, n))
        if prepacked:
            cuts = np.unique(rng.integers(1, n, rng.integers(0, 4))) if n > 1 else np.zeros(0, np.int64)
            ex["seq_lengths"] = np.diff(np.concatenate([[0], cuts, [n]]))
        if container == "list":
            ex = {k: v.tolist() for k, v in ex.items()}
        elif container == "torch":
            ex = {k: torch.from_numpy(v) for k, v in ex.items()}
        features.append(ex)
    return features


def assert_same_batch(ours: dict, theirs: dict, keys=None) -> None:
    """Element for element: the same keys (or `keys`), types, dtypes, shapes and values."""
    if keys is None:
        assert set(ours) == set(theirs)
        keys = theirs
    for key in keys:
        a, b = ours[key], theirs[key]
        assert type(a) is type(b), (key, type(a), type(b))
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype, (key, a.dtype, b.dtype)
            assert a.shape == b.shape, (key, a.shape, b.shape)
            assert torch.equal(a, b), key
        elif isinstance(b, np.ndarray):
            assert a.dtype == b.dtype, (key, a.dtype, b.dtype)
            assert a.shape == b.shape, (key, a.shape, b.shape)
            np.testing.assert_array_equal(a, b, err_msg=key)
        else:
            assert a == b, key


# ---------------------------------------------------------------------------------------------
# transformers' DataCollatorWithFlattening
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
@pytest.mark.parametrize("labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize(
    "options",
    [{}, {"position_ids_start": 2}, {"separator_id": -1}, {"position_ids_start": 2, "separator_id": -1}],
    ids=["default", "position_ids_start=2", "separator_id=-1", "both"],
)
def test_equals_hf_data_collator_with_flattening(return_tensors, labels, options):
    hf = DataCollatorWithFlattening(
        return_flash_attn_kwargs=True, return_seq_idx=True, return_tensors=return_tensors, **options
    )
    ours = PackedCollator(return_seq_idx=True, return_tensors=return_tensors, **options)
    for seed in SEEDS:
        features = random_features(seed, labels=labels)
        assert_same_batch(ours(features), hf(features))


@pytest.mark.parametrize("container", ["list", "numpy", "torch"])
def test_equals_hf_for_every_input_container(container):
    hf = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    ours = PackedCollator(return_seq_idx=True)
    for seed in SEEDS:
        features = random_features(seed, labels=True, container=container)
        assert_same_batch(ours(features), hf(features))


def test_equals_hf_without_flash_attn_kwargs():
    """Both collators' minimal output: input_ids, labels, position_ids."""
    hf = DataCollatorWithFlattening()
    ours = PackedCollator(return_flash_attn_kwargs=False)
    for seed in SEEDS:
        features = random_features(seed)
        assert_same_batch(ours(features), hf(features))


# ---------------------------------------------------------------------------------------------
# TRL's padding-free DataCollatorForLanguageModeling
# ---------------------------------------------------------------------------------------------
# TRL always returns seq_idx in padding-free mode, so we compare with return_seq_idx=True. TRL sets
# the label to -100 wherever position_ids == 0 (every sequence start), as we do.
#
# pad_to_multiple_of is deliberately not compared: TRL pads the row with position_ids 0, so its
# padding becomes one length-1 sequence per pad token (cu_seq_lens gets an entry per pad token),
# whereas we append a single padding segment with positions 0 … pad-1 and one cu_seq_lens entry.
# Both are valid layouts, but they differ by design.


def trl_collator():
    return trl_sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)


@pytest.mark.parametrize("labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("prepacked", [False, True], ids=["examples", "seq_lengths"])
def test_equals_trl_padding_free_collator(labels, prepacked):
    trl, ours = trl_collator(), PackedCollator(return_seq_idx=True)
    for seed in SEEDS:
        features = random_features(seed, labels=labels, prepacked=prepacked)
        assert_same_batch(ours(features), trl(features))


def test_equals_trl_on_numpy_inputs():
    trl, ours = trl_collator(), PackedCollator(return_seq_idx=True)
    for seed in SEEDS:
        features = random_features(seed, labels=True, prepacked=True, container="numpy")
        assert_same_batch(ours(features), trl(features))


def test_hf_and_trl_agree_where_we_agree_with_both():
    """A sanity check of the references themselves on plain examples (no seq_lengths)."""
    hf = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    for seed in SEEDS:
        features = random_features(seed, labels=True)
        assert_same_batch(hf(features), trl_collator()(features))
