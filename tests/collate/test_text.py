"""`PackedCollator` and `PaddedCollator` (`packcollate.collate.text`): the packed row, its keys and types, padding,
extra and passthrough keys, statistics, the padded baseline, and the options and keys the collators refuse.

Each test states one rule of the packed-batch contract (docs: /DESIGN.md, `packcollate.collate.text`) on a
small hand-written batch whose expected output can be read off directly. The collators refuse options and
keys that would silently replace what they compute, and count every batch when called from several threads.
Labels, the length policy and the checks of the examples themselves: test_labels.py, test_lengths.py,
test_features.py.
"""

from __future__ import annotations

import copy
import pickle
import sys
import threading

import numpy as np
import pytest
import torch

from packcollate import CollateStats, PackedCollator, PaddedCollator
from tests.helpers import (
    COLLATORS,
    CU,
    FEATURES,
    GOOD,
    IDS,
    IGNORE,
    POSITIONS,
    assert_batches_equal,
    raises,
    row,
    to_numpy,
)

TOKEN_KEYS = ("input_ids", "labels", "position_ids")
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
OUTPUT_KEYS = ["input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
               "max_length_k", "seq_idx", "completion_mask", "assistant_masks", "attention_mask", "seq_lengths"]


def examples(n=3):
    return [{"input_ids": list(range(1, 3 + i)), "completion_mask": [0] + [1] * (1 + i)} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The layout and its types
# ---------------------------------------------------------------------------------------------


def test_default_batch_is_one_row_with_restarting_positions():
    """Tokens in order, positions restart per example, first label of each example -100, no pad."""
    batch = to_numpy(PackedCollator()(FEATURES))
    assert set(batch) == {*TOKEN_KEYS, *FLASH_KEYS}
    assert row(batch, "input_ids") == IDS
    assert row(batch, "position_ids") == POSITIONS
    assert row(batch, "labels") == [IGNORE, 12, 13, IGNORE, 22, IGNORE, 32, 33, 34]
    assert batch["cu_seq_lens_q"].tolist() == CU
    assert batch["cu_seq_lens_k"].tolist() == CU
    assert batch["max_length_q"] == batch["max_length_k"] == 4


@pytest.mark.parametrize("return_seq_idx", [False, True])
def test_pt_types_and_dtypes(return_seq_idx):
    """"pt": (1, N) int64 tokens, (k+1,) int32 cu_seq_lens, Python int max lengths, (1, N) int32 seq_idx."""
    batch = PackedCollator(return_seq_idx=return_seq_idx)(FEATURES)
    for key in TOKEN_KEYS:
        assert isinstance(batch[key], torch.Tensor), key
        assert batch[key].dtype == torch.int64, key
        assert tuple(batch[key].shape) == (1, 9), key
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert isinstance(batch[key], torch.Tensor)
        assert batch[key].dtype == torch.int32
        assert tuple(batch[key].shape) == (4,)
    for key in ("max_length_q", "max_length_k"):
        assert type(batch[key]) is int
    if return_seq_idx:
        assert isinstance(batch["seq_idx"], torch.Tensor)
        assert batch["seq_idx"].dtype == torch.int32
        assert tuple(batch["seq_idx"].shape) == (1, 9)
    else:
        assert "seq_idx" not in batch


@pytest.mark.parametrize("per_call", [False, True], ids=["constructor", "per_call"])
def test_np_types_and_dtypes(per_call):
    """"np" (set on the collator or per call): the same layout as numpy arrays."""
    if per_call:
        batch = PackedCollator(return_seq_idx=True)(FEATURES, return_tensors="np")
    else:
        batch = PackedCollator(return_seq_idx=True, return_tensors="np")(FEATURES)
    for key in TOKEN_KEYS:
        assert isinstance(batch[key], np.ndarray), key
        assert batch[key].dtype == np.int64, key
        assert batch[key].shape == (1, 9), key
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert isinstance(batch[key], np.ndarray)
        assert batch[key].dtype == np.int32
        assert batch[key].shape == (4,)
    assert type(batch["max_length_q"]) is int and type(batch["max_length_k"]) is int
    assert isinstance(batch["seq_idx"], np.ndarray)
    assert batch["seq_idx"].dtype == np.int32 and batch["seq_idx"].shape == (1, 9)


def test_per_call_return_tensors_overrides_the_collator():
    """return_tensors="pt" per call wins over a collator built with "np", and gives the same values."""
    collator = PackedCollator(return_tensors="np", return_seq_idx=True)
    pt = collator(FEATURES, return_tensors="pt")
    assert isinstance(pt["input_ids"], torch.Tensor)
    assert_batches_equal(to_numpy(pt), collator(FEATURES))


def test_cu_seq_lens_q_and_k_are_independent_tensors():
    """Writing to one of cu_seq_lens_q/_k (in place, as some kernels' wrappers do) leaves the other."""
    batch = PackedCollator()(FEATURES)
    batch["cu_seq_lens_q"][1] = 99
    assert batch["cu_seq_lens_k"].tolist() == CU


def test_seq_idx_is_example_index_of_each_token():
    batch = PackedCollator(return_seq_idx=True)(FEATURES)
    assert row(batch, "seq_idx") == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_return_flash_attn_kwargs_false_omits_cu_seq_lens_and_max_length():
    batch = PackedCollator(return_flash_attn_kwargs=False)(FEATURES)
    assert set(batch) == set(TOKEN_KEYS)
    assert row(batch, "position_ids") == POSITIONS


def test_position_ids_start_offsets_every_example():
    """position_ids_start=2 (RoBERTa-style): every example counts from 2; nothing else changes."""
    base = to_numpy(PackedCollator()(FEATURES))
    batch = to_numpy(PackedCollator(position_ids_start=2)(FEATURES))
    assert row(batch, "position_ids") == [p + 2 for p in POSITIONS]
    assert row(batch, "labels") == row(base, "labels")
    assert batch["cu_seq_lens_q"].tolist() == CU


def test_separator_id_labels_the_first_token_of_each_example():
    batch = PackedCollator(separator_id=-1)(FEATURES)
    assert row(batch, "labels") == [-1, 12, 13, -1, 22, -1, 32, 33, 34]


def test_no_attention_mask_is_ever_emitted():
    """With an attention_mask transformers ignores the packing: never emit one, whatever the options."""
    features = [{**f, "attention_mask": [1] * len(f["input_ids"])} for f in FEATURES]
    for options in [
        {},
        {"return_seq_idx": True},
        {"pad_to_multiple_of": 8},
        {"return_flash_attn_kwargs": False},
        {"max_seq_length": 2, "overflow": "split"},
        {"return_tensors": "np"},
    ]:
        assert "attention_mask" not in PackedCollator(**options)(features), options
        assert "attention_mask" not in PackedCollator(**options)(FEATURES), options


def test_batch_longer_than_65536_tokens_has_correct_positions():
    """Positions stay right past any internal cache size, and for a short batch afterwards."""
    lengths = [40_000, 1, 30_000]
    features = [{"input_ids": np.full(n, 3)} for n in lengths]
    batch = PackedCollator(return_tensors="np", return_seq_idx=True)(features)
    expected = np.concatenate([np.arange(n) for n in lengths])
    np.testing.assert_array_equal(batch["position_ids"][0], expected)
    assert batch["cu_seq_lens_q"].tolist() == [0, 40_000, 40_001, 70_001]
    assert batch["max_length_q"] == 40_000
    assert row(PackedCollator()(FEATURES), "position_ids") == POSITIONS


# ---------------------------------------------------------------------------------------------
# Pre-packed rows (`seq_lengths`, TRL's format)
# ---------------------------------------------------------------------------------------------


def test_seq_lengths_split_a_row_into_independent_sequences():
    """A pre-packed row: positions restart, cu_seq_lens split, first label of every sub-sequence masked."""
    features = [
        {"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [2, 3]},
        {"input_ids": [6, 7, 8], "seq_lengths": [3]},
    ]
    collator = PackedCollator(return_seq_idx=True)
    batch = to_numpy(collator(features))
    assert "seq_lengths" not in batch
    assert row(batch, "input_ids") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert row(batch, "position_ids") == [0, 1, 0, 1, 2, 0, 1, 2]
    assert row(batch, "labels") == [IGNORE, 2, IGNORE, 4, 5, IGNORE, 7, 8]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 5, 8]
    assert batch["max_length_q"] == 3
    assert row(batch, "seq_idx") == [0, 0, 1, 1, 1, 2, 2, 2]
    assert collator.stats.examples == 2 and collator.stats.sequences == 3


# ---------------------------------------------------------------------------------------------
# pad_to_multiple_of
# ---------------------------------------------------------------------------------------------


def test_pad_to_multiple_of_appends_one_padding_segment():
    collator = PackedCollator(pad_to_multiple_of=8, pad_token_id=5, return_seq_idx=True)
    batch = to_numpy(collator(FEATURES))
    n = 16
    assert batch["input_ids"].shape == (1, n)
    assert row(batch, "input_ids") == IDS + [5] * 7
    assert row(batch, "labels")[9:] == [IGNORE] * 7
    assert row(batch, "position_ids") == POSITIONS + list(range(7))
    assert batch["cu_seq_lens_q"].tolist() == CU + [n]
    assert batch["cu_seq_lens_k"].tolist() == CU + [n]
    assert row(batch, "seq_idx") == [0, 0, 0, 1, 1, 2, 2, 2, 2] + [3] * 7
    # the kernel's max length covers every segment, the padding one included
    assert batch["max_length_q"] == batch["max_length_k"] == 7
    assert collator.stats.padding_tokens == 7
    assert collator.stats.tokens == 9


def test_pad_to_multiple_of_adds_nothing_when_already_a_multiple():
    collator = PackedCollator(pad_to_multiple_of=3)
    batch = to_numpy(collator(FEATURES))
    assert row(batch, "input_ids") == IDS
    assert batch["cu_seq_lens_q"].tolist() == CU
    assert collator.stats.padding_tokens == 0


def test_pad_to_multiple_of_pads_extra_keys_with_zero():
    features = [{"input_ids": [1, 2, 3], "token_type_ids": [1, 1, 1]}]
    batch = PackedCollator(pad_to_multiple_of=4)(features)
    assert row(batch, "token_type_ids") == [1, 1, 1, 0]


# ---------------------------------------------------------------------------------------------
# Extra and passthrough keys
# ---------------------------------------------------------------------------------------------


def test_extra_per_token_keys_are_concatenated():
    features = [
        {"input_ids": [1, 2, 3], "token_type_ids": [0, 0, 1]},
        {"input_ids": [4, 5], "token_type_ids": np.array([1, 1], dtype=np.int32)},
    ]
    batch = PackedCollator()(features)
    assert row(batch, "token_type_ids") == [0, 0, 1, 1, 1]
    assert batch["token_type_ids"].dtype == torch.int64
    assert tuple(batch["token_type_ids"].shape) == (1, 5)


def test_float_extra_keys_stay_float():
    features = [{"input_ids": [1, 2], "weights": [0.5, 1.0]}, {"input_ids": [3], "weights": [2.0]}]
    batch = PackedCollator(return_tensors="np")(features)
    assert batch["weights"].dtype.kind == "f"
    assert batch["weights"].tolist() == [[0.5, 1.0, 2.0]]


def test_extra_keys_follow_the_length_policy():
    features = [{"input_ids": [1, 2, 3, 4], "token_type_ids": [5, 6, 7, 8]}, {"input_ids": [9], "token_type_ids": [1]}]
    assert row(PackedCollator(max_seq_length=2)(features), "token_type_ids") == [5, 6, 1]
    assert row(PackedCollator(max_seq_length=2, overflow="drop")(features), "token_type_ids") == [1]


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_passthrough_keys_are_returned_per_example(return_tensors):
    """Numeric per-example values become a (k,) tensor/array; non-numeric ones a list."""
    features = [
        {"input_ids": [1, 2], "idx": 7, "source": "a"},
        {"input_ids": [3], "idx": 8, "source": "b"},
    ]
    batch = PackedCollator(passthrough_keys=["idx", "source"], return_tensors=return_tensors)(features)
    array_type = torch.Tensor if return_tensors == "pt" else np.ndarray
    assert isinstance(batch["idx"], array_type)
    assert tuple(batch["idx"].shape) == (2,)
    assert batch["idx"].tolist() == [7, 8]
    assert batch["source"] == ["a", "b"]
    assert row(batch, "input_ids") == [1, 2, 3]


@pytest.mark.parametrize("cls", [PackedCollator, PaddedCollator])
@pytest.mark.parametrize(
    "features, options, expected",
    [
        # split: the long example's value for each of its pieces
        ([{"input_ids": [1] * 5, "w": 0.1}, {"input_ids": [2] * 2, "w": 0.9}],
         {"max_seq_length": 3, "overflow": "split"}, [0.1, 0.1, 0.9]),
        # drop: the dropped example's value goes with it
        ([{"input_ids": [1] * 5, "w": 0.1}, {"input_ids": [2] * 2, "w": 0.9}],
         {"max_seq_length": 3, "overflow": "drop"}, [0.9]),
        # a pre-packed row: its value for each sub-sequence
        ([{"input_ids": [1, 1, 2], "seq_lengths": [2, 1], "w": 0.1}, {"input_ids": [3], "seq_lengths": [1], "w": 0.9}],
         {}, [0.1, 0.1, 0.9]),
    ],
    ids=["split", "drop", "pre-packed"],
)
def test_passthrough_values_follow_the_sequences(cls, features, options, expected):
    """One value per sequence (per row of the padded batch, per `cu_seq_lens` segment of the packed one)."""
    batch = cls(passthrough_keys=["w"], **options)(features)
    assert batch["w"].tolist() == pytest.approx(expected)
    sequences = batch["input_ids"].shape[0] if cls is PaddedCollator else len(batch["cu_seq_lens_q"]) - 1
    assert sequences == len(expected)


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


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def test_stats_count_batches_examples_sequences_and_tokens():
    collator = PackedCollator(pad_to_multiple_of=4)
    collator(FEATURES)  # 9 tokens -> 3 padding
    collator([{"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [2, 3]}])  # 5 tokens -> 3 padding
    assert collator.stats == CollateStats(batches=2, examples=4, sequences=5, tokens=14, padding_tokens=6)
    collator.stats.reset()
    assert collator.stats == CollateStats()


def test_stats_are_per_collator():
    a, b = PackedCollator(), PackedCollator()
    a(FEATURES)
    assert a.stats.batches == 1 and b.stats.batches == 0


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


# ---------------------------------------------------------------------------------------------
# PaddedCollator
# ---------------------------------------------------------------------------------------------


def test_padded_collator_shapes_padding_and_attention_mask():
    collator = PaddedCollator(pad_token_id=0)
    batch = to_numpy(collator(FEATURES))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key in batch:
        assert batch[key].shape == (3, 4) and batch[key].dtype == np.int64, key
    assert batch["input_ids"].tolist() == [[11, 12, 13, 0], [21, 22, 0, 0], [31, 32, 33, 34]]
    assert batch["labels"].tolist() == [
        [IGNORE, 12, 13, IGNORE],
        [IGNORE, 22, IGNORE, IGNORE],
        [IGNORE, 32, 33, 34],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert collator.stats.padding_tokens == 3


def test_padded_collator_position_ids_and_pad_to_multiple_of():
    batch = PaddedCollator(pad_token_id=9, return_position_ids=True, pad_to_multiple_of=3)(FEATURES)
    assert isinstance(batch["position_ids"], torch.Tensor) and batch["position_ids"].dtype == torch.int64
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 2, 3, 0, 0]]
    assert batch["input_ids"][1].tolist() == [21, 22, 9, 9, 9, 9]
    assert int(batch["attention_mask"].sum()) == 9


def test_padded_collator_makes_one_row_per_sub_sequence():
    features = [{"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [2, 3]}]
    batch = PaddedCollator(return_tensors="np")(features)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [3, 4, 5]]
    assert batch["labels"].tolist() == [[IGNORE, 2, IGNORE], [IGNORE, 4, 5]]


def test_padded_collator_pads_extra_keys_with_zero():
    features = [{"input_ids": [1, 2], "token_type_ids": [3, 3]}, {"input_ids": [4], "token_type_ids": [5]}]
    batch = PaddedCollator()(features)
    assert batch["token_type_ids"].tolist() == [[3, 3], [5, 0]]


def test_padded_like_shares_the_label_and_length_options():
    packed = PackedCollator(
        max_seq_length=3,
        overflow="drop",
        completion_only_loss=False,
        response_template=[7],
        instruction_template=[8],
        on_missing_template="error",
        separator_id=-1,
        passthrough_keys=("idx",),
        return_tensors="np",
        pad_token_id=4,
        pad_to_multiple_of=64,
        position_ids_start=2,
    )
    padded = PaddedCollator.like(packed)
    for name in (
        "max_seq_length",
        "overflow",
        "completion_only_loss",
        "response_template",
        "instruction_template",
        "on_missing_template",
        "separator_id",
        "passthrough_keys",
        "return_tensors",
        "pad_token_id",
    ):
        assert getattr(padded, name) == getattr(packed, name), name
    assert padded.pad_to_multiple_of is None  # a packed row's padding is not a padded batch's width
    assert PaddedCollator.like(packed, pad_token_id=0, return_position_ids=True).pad_token_id == 0


def test_padded_like_gives_the_same_labels():
    packed = PackedCollator(response_template=[7], separator_id=-1, max_seq_length=4, overflow="split")
    padded = PaddedCollator.like(packed)
    features = [{"input_ids": [1, 7, 2, 3, 4, 5]}, {"input_ids": [7, 6]}, {"input_ids": [1, 2, 3]}]
    p = to_numpy(packed(features))
    q = to_numpy(padded(features))
    assert row(p, "labels") == q["labels"][q["attention_mask"] == 1].tolist()
    assert row(p, "labels") == [-1, IGNORE, 2, 3, -1, 5, -1, 6, -1, IGNORE, IGNORE]


def test_padded_collator_passthrough_keys():
    features = [{"input_ids": [1, 2], "idx": 3}, {"input_ids": [4], "idx": 5}]
    batch = PaddedCollator(passthrough_keys=["idx"])(features)
    assert batch["idx"].tolist() == [3, 5]


def test_collators_do_not_modify_features():
    features = [
        {"input_ids": np.array([1, 2, 3]), "labels": torch.tensor([1, 2, 3]), "completion_mask": [0, 1, 1]},
        {"input_ids": np.array([4, 5]), "labels": torch.tensor([4, 5]), "completion_mask": [1, 1]},
    ]
    before = copy.deepcopy(features)
    for collator in (PackedCollator(pad_to_multiple_of=4), PaddedCollator()):
        batch = collator(features)
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                value.fill_(77)  # the output shares no memory with the input
    for f, b in zip(features, before):
        np.testing.assert_array_equal(f["input_ids"], b["input_ids"])
        assert torch.equal(f["labels"], b["labels"])
        assert f["completion_mask"] == b["completion_mask"]


# ---------------------------------------------------------------------------------------------
# Invalid options: refused when the collator is built (or called)
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


@pytest.mark.parametrize("value", [-3, -1, True, 1.5, "2"])
def test_position_ids_start_must_be_a_non_negative_int(value):
    with pytest.raises(ValueError, match=rf"position_ids_start: expected a non-negative int, got {value!r}"):
        PackedCollator(position_ids_start=value)


@pytest.mark.parametrize("cls", COLLATORS)
@pytest.mark.parametrize("value", [-1, -100, False, 0.0])
def test_pad_token_id_must_be_a_non_negative_int(cls, value):
    with pytest.raises(ValueError, match=rf"pad_token_id: expected a non-negative int, got {value!r}"):
        cls(pad_token_id=value)


# ---------------------------------------------------------------------------------------------
# Templates and the length policy, at call time
# ---------------------------------------------------------------------------------------------


def test_on_missing_template_error():
    features = [{"input_ids": [9, 1]}, {"input_ids": [9, 2]}, {"input_ids": [1, 2]}]
    raises(features, ValueError, "example 2", "expected the response_template [9]", "got 1 of 3",
           response_template=[9], on_missing_template="error")


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
