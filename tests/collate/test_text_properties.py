"""Invariants of the packed-batch contract (`PackedCollator`, `PaddedCollator`: `packcollate.collate.text`), checked
on hundreds of random batches (hypothesis).

Every property compares the collator's vectorised output with a plain, per-example Python reading of
the contract (the oracle), written here so that it can be checked by eye.
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from packcollate import PackedCollator, PaddedCollator

IGNORE = -100
MASK_KEYS = ("completion_mask", "assistant_masks")
CONTAINERS = ("list", "np64", "np32", "torch")


# ---------------------------------------------------------------------------------------------
# Strategies: a batch as plain lists (the truth) and as the features handed to the collator
# ---------------------------------------------------------------------------------------------


def wrap(values: list, container: str):
    if container == "np64":
        return np.asarray(values, dtype=np.int64)
    if container == "np32":
        return np.asarray(values, dtype=np.int32)
    if container == "torch":
        return torch.tensor(values, dtype=torch.int64)
    return list(values)


def partition(rng: np.random.Generator, length: int) -> list[int]:
    """Positive parts summing to `length` (the sub-sequences of a pre-packed row)."""
    cuts = np.unique(rng.integers(1, length, size=rng.integers(0, 4))) if length > 1 else []
    bounds = [0, *map(int, cuts), length]
    return [b - a for a, b in zip(bounds, bounds[1:])]


@st.composite
def batches(draw, vocab=50, max_len=20, max_examples=8, labels=None, masks=None, prepacked=None, containers=True):
    """(features, spec): `spec` holds each example's keys as plain lists; `features` the same values
    in lists / numpy arrays / torch tensors (mixed at random when `containers`).

    Hypothesis draws the structure (lengths, which keys, pre-packing); the token values come from a
    drawn seed (drawing every token through hypothesis would be ten times slower).
    """
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_examples))
    with_labels = draw(st.booleans()) if labels is None else labels
    mask_keys = sorted(draw(st.sets(st.sampled_from(MASK_KEYS)))) if masks is None else sorted(masks)
    with_seq = draw(st.booleans()) if prepacked is None else prepacked
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spec, features = [], []
    for n in lengths:
        ex = {"input_ids": rng.integers(0, vocab, n).tolist()}
        if with_labels:
            ex["labels"] = rng.choice([IGNORE, 0, 1, 2, 3, vocab + 5], n).tolist()
        for key in mask_keys:
            ex[key] = rng.integers(0, 2, n).tolist()
        if with_seq:
            ex["seq_lengths"] = partition(rng, n)
        spec.append(ex)
        features.append({key: wrap(v, rng.choice(CONTAINERS) if containers else "list") for key, v in ex.items()})
    return features, spec


def segments_of(spec: list[dict]) -> list[dict]:
    """Each sequence the collator keeps apart (examples, or sub-sequences of pre-packed rows), as lists."""
    out = []
    for ex in spec:
        start = 0
        for n in ex.get("seq_lengths", [len(ex["input_ids"])]):
            out.append({k: v[start : start + n] for k, v in ex.items() if k != "seq_lengths"})
            start += n
    return out


def reference_labels(seg: dict, separator_id: int = IGNORE, trained=None) -> list[int]:
    """The contract's labels for one sequence: its labels (or input_ids), -100 where a mask is 0 or
    `trained` is False, and `separator_id` on the first token."""
    labels = list(seg.get("labels", seg["input_ids"]))
    for i in range(len(labels)):
        if any(seg[key][i] == 0 for key in MASK_KEYS if key in seg) or (trained is not None and not trained[i]):
            labels[i] = IGNORE
    labels[0] = separator_id
    return labels


def np_batch(batch: dict) -> dict:
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def flat(batch: dict, key: str) -> list:
    value = np_batch(batch)[key]
    assert value.ndim == 2 and value.shape[0] == 1, key
    return value[0].tolist()


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


@given(batches())
def test_tokens_are_preserved_in_order(data):
    features, spec = data
    batch = PackedCollator()(features)
    assert flat(batch, "input_ids") == [t for ex in spec for t in ex["input_ids"]]


@given(batches(), st.integers(0, 3))
def test_positions_restart_at_each_sequence(data, start):
    features, spec = data
    batch = PackedCollator(position_ids_start=start)(features)
    expected = [start + i for seg in segments_of(spec) for i in range(len(seg["input_ids"]))]
    assert flat(batch, "position_ids") == expected


@given(batches())
def test_cu_seq_lens_is_the_cumulative_sum_of_lengths(data):
    features, spec = data
    lengths = [len(seg["input_ids"]) for seg in segments_of(spec)]
    batch = np_batch(PackedCollator()(features))
    expected = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert batch["cu_seq_lens_q"].tolist() == expected
    assert batch["cu_seq_lens_k"].tolist() == expected
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)


@given(batches(), st.sampled_from([None, 1, 4, 16]))
def test_seq_idx_is_consistent_with_cu_seq_lens(data, pad_to_multiple_of):
    features, _ = data
    batch = np_batch(PackedCollator(return_seq_idx=True, pad_to_multiple_of=pad_to_multiple_of)(features))
    cu, seq_idx = batch["cu_seq_lens_q"], batch["seq_idx"][0]
    assert len(seq_idx) == cu[-1] == batch["input_ids"].shape[1]
    for i in range(len(cu) - 1):
        assert (seq_idx[cu[i] : cu[i + 1]] == i).all()
    # positions restart exactly where seq_idx changes
    positions = batch["position_ids"][0]
    assert ((positions == 0) == np.r_[True, seq_idx[1:] != seq_idx[:-1]]).all()
    if pad_to_multiple_of:
        assert len(seq_idx) % pad_to_multiple_of == 0


@given(batches(), st.sampled_from(["pt", "np"]), st.booleans(), st.sampled_from([None, 8]))
def test_output_types_and_dtypes(data, return_tensors, return_seq_idx, pad_to_multiple_of):
    features, _ = data
    collator = PackedCollator(
        return_tensors=return_tensors, return_seq_idx=return_seq_idx, pad_to_multiple_of=pad_to_multiple_of
    )
    batch = np_batch(out := collator(features))
    array_type = torch.Tensor if return_tensors == "pt" else np.ndarray
    n = batch["input_ids"].shape[1]
    k = len(batch["cu_seq_lens_q"]) - 1
    expected = {
        "input_ids": (np.int64, (1, n)),
        "labels": (np.int64, (1, n)),
        "position_ids": (np.int64, (1, n)),
        "cu_seq_lens_q": (np.int32, (k + 1,)),
        "cu_seq_lens_k": (np.int32, (k + 1,)),
    }
    if return_seq_idx:
        expected["seq_idx"] = (np.int32, (1, n))
    assert set(out) == {*expected, "max_length_q", "max_length_k"}
    for key, (dtype, shape) in expected.items():
        assert isinstance(out[key], array_type), key
        assert batch[key].dtype == dtype and batch[key].shape == shape, key
    assert type(out["max_length_q"]) is int and type(out["max_length_k"]) is int


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


@given(batches(), st.sampled_from([IGNORE, -1, 0]))
def test_labels_follow_the_contract(data, separator_id):
    """-100 / separator at sequence starts, -100 at masked (prompt) tokens, else labels or input_ids."""
    features, spec = data
    batch = PackedCollator(separator_id=separator_id)(features)
    expected = [t for seg in segments_of(spec) for t in reference_labels(seg, separator_id)]
    assert flat(batch, "labels") == expected


@given(batches(masks=MASK_KEYS))
def test_completion_only_loss_false_ignores_every_mask(data):
    features, spec = data
    batch = PackedCollator(completion_only_loss=False)(features)
    unmasked = [{k: v for k, v in seg.items() if k not in MASK_KEYS} for seg in segments_of(spec)]
    assert flat(batch, "labels") == [t for seg in unmasked for t in reference_labels(seg)]


def template_trained(ids: list[int], response: list[int], instruction: list[int] | None) -> list[bool]:
    """Oracle, one sequence, a plain loop: which tokens are trained on.

    Without an instruction template: every token after the first complete response template.
    With one: a token is trained on when the latest event before it is the end of a response template;
    an instruction template starting at a token (or the sequence start) closes training there.
    """
    n, m = len(ids), len(response)
    if instruction is None:
        for t in range(n - m + 1):
            if ids[t : t + m] == response:
                return [u >= t + m for u in range(n)]
        return [False] * n
    trained, state = [], False
    for t in range(n):
        if ids[t : t + len(instruction)] == instruction:
            state = False
        elif t >= m and ids[t - m : t] == response:
            state = True
        trained.append(state)
    return trained


templates = st.lists(st.integers(0, 3), min_size=1, max_size=3)


@given(
    batches(vocab=4, max_len=24, masks=(), containers=False),
    templates,
    st.one_of(st.none(), templates),
)
def test_response_template_masking_equals_reference(data, response, instruction):
    """Random tokens from a 4-token vocabulary, so that templates appear (and overlap) often."""
    features, spec = data
    collator = PackedCollator(response_template=response, instruction_template=instruction)
    batch = collator(features)
    segments = segments_of(spec)
    expected = [
        t
        for seg in segments
        for t in reference_labels(seg, trained=template_trained(seg["input_ids"], response, instruction))
    ]
    assert flat(batch, "labels") == expected
    missing = sum(
        not any(seg["input_ids"][t : t + len(response)] == response for t in range(len(seg["input_ids"])))
        for seg in segments
    )
    assert collator.stats.missing_template == missing


# ---------------------------------------------------------------------------------------------
# Inputs are never written to; packed and padded agree
# ---------------------------------------------------------------------------------------------


def snapshot(features: list[dict]) -> list[dict]:
    """A deep copy that remembers each value's type and dtype."""
    return [
        {k: (type(v), getattr(v, "dtype", None), copy.deepcopy(v)) for k, v in f.items()} for f in features
    ]


def assert_unchanged(features: list[dict], before: list[dict]) -> None:
    assert len(features) == len(before)
    for f, b in zip(features, before):
        assert f.keys() == b.keys()
        for key, (kind, dtype, value) in b.items():
            now = f[key]
            assert type(now) is kind and getattr(now, "dtype", None) == dtype, key
            if isinstance(value, torch.Tensor):
                assert torch.equal(now, value), key
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(now, value, err_msg=key)
            else:
                assert now == value, key


@given(
    batches(),
    st.sampled_from([None, 3]),
    st.sampled_from(["truncate", "split", "drop"]),
    st.one_of(st.none(), st.just([1])),
    st.sampled_from([None, 8]),
)
def test_input_features_are_not_mutated(data, max_seq_length, overflow, response_template, pad):
    """Deep-compare the features before and after (lists, numpy arrays, torch tensors), and scribble
    over the output: it must share no memory with the input."""
    features, _ = data
    before = snapshot(features)
    options = dict(max_seq_length=max_seq_length, overflow=overflow, response_template=response_template)
    for collator in (PackedCollator(pad_to_multiple_of=pad, **options), PaddedCollator(**options)):
        for return_tensors in ("pt", "np"):
            try:
                batch = collator(features, return_tensors=return_tensors)
            except ValueError:  # overflow="drop" removed every example
                continue
            for value in batch.values():
                if isinstance(value, (torch.Tensor, np.ndarray)):
                    value[...] = 77
            assert_unchanged(features, before)


@given(
    batches(),
    st.sampled_from([None, 1, 3, 7]),
    st.sampled_from(["truncate", "split", "drop"]),
    st.one_of(st.none(), st.just([1]), st.just([2, 3])),
    st.sampled_from([IGNORE, -1]),
    st.booleans(),
)
def test_packed_labels_equal_padded_labels(data, max_seq_length, overflow, response_template, separator_id, cm):
    """Same label semantics: the packed row's labels are the padded batch's labels at its non-pad tokens."""
    features, _ = data
    packed = PackedCollator(
        max_seq_length=max_seq_length,
        overflow=overflow,
        response_template=response_template,
        separator_id=separator_id,
        completion_only_loss=cm,
        return_tensors="np",
    )
    padded = PaddedCollator.like(packed)
    try:
        p = packed(features)
    except ValueError:
        with pytest.raises(ValueError):
            padded(features)
        return
    q = padded(features)
    real = q["attention_mask"] == 1
    assert flat(p, "labels") == q["labels"][real].tolist()
    assert flat(p, "input_ids") == q["input_ids"][real].tolist()
    assert (q["labels"][~real] == IGNORE).all()
    assert np.diff(p["cu_seq_lens_q"]).tolist() == real.sum(1).tolist()


# ---------------------------------------------------------------------------------------------
# Length policy
# ---------------------------------------------------------------------------------------------


@given(batches(), st.integers(1, 8))
def test_split_keeps_every_token_in_pieces_of_at_most_max_seq_length(data, max_seq_length):
    features, spec = data
    collator = PackedCollator(max_seq_length=max_seq_length, overflow="split")
    batch = np_batch(collator(features))
    segments = segments_of(spec)
    assert flat(batch, "input_ids") == [t for seg in segments for t in seg["input_ids"]]
    pieces = np.diff(batch["cu_seq_lens_q"]).tolist()
    # each sequence becomes full pieces of max_seq_length and one shorter (or full) tail
    expected = []
    for seg in segments:
        n = len(seg["input_ids"])
        expected += [max_seq_length] * ((n - 1) // max_seq_length) + [n - max_seq_length * ((n - 1) // max_seq_length)]
    assert pieces == expected
    assert max(pieces) <= max_seq_length and batch["max_length_q"] <= max_seq_length
    # each piece is its own sequence: positions restart, first label is the separator
    starts = batch["cu_seq_lens_q"][:-1]
    assert (batch["position_ids"][0][starts] == 0).all()
    assert (batch["labels"][0][starts] == IGNORE).all()
    assert collator.stats.split_sequences == sum(len(s["input_ids"]) > max_seq_length for s in segments)


@given(batches(), st.integers(1, 8))
def test_truncate_keeps_the_prefix_of_each_sequence(data, max_seq_length):
    features, spec = data
    collator = PackedCollator(max_seq_length=max_seq_length)
    batch = np_batch(collator(features))
    segments = segments_of(spec)
    assert flat(batch, "input_ids") == [t for seg in segments for t in seg["input_ids"][:max_seq_length]]
    # labels are the untruncated sequence's labels, cut to the same prefix
    assert flat(batch, "labels") == [t for seg in segments for t in reference_labels(seg)[:max_seq_length]]
    lengths = [len(seg["input_ids"]) for seg in segments]
    assert np.diff(batch["cu_seq_lens_q"]).tolist() == [min(n, max_seq_length) for n in lengths]
    assert collator.stats.truncated_sequences == sum(n > max_seq_length for n in lengths)
    assert collator.stats.truncated_tokens == sum(max(0, n - max_seq_length) for n in lengths)


@given(batches(), st.integers(1, 8))
def test_drop_removes_exactly_the_long_sequences(data, max_seq_length):
    features, spec = data
    segments = segments_of(spec)
    kept = [seg for seg in segments if len(seg["input_ids"]) <= max_seq_length]
    assume(kept)  # dropping every sequence is an error, tested elsewhere
    collator = PackedCollator(max_seq_length=max_seq_length, overflow="drop")
    batch = collator(features)
    assert flat(batch, "input_ids") == [t for seg in kept for t in seg["input_ids"]]
    assert flat(batch, "labels") == [t for seg in kept for t in reference_labels(seg)]
    assert collator.stats.dropped_sequences == len(segments) - len(kept)
    assert collator.stats.dropped_tokens == sum(len(s["input_ids"]) for s in segments) - sum(
        len(s["input_ids"]) for s in kept
    )
