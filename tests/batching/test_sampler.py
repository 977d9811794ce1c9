"""`TokenBudgetBatchSampler` (`packcollate.batching.sampler`): its guarantees, as properties and examples.

Every epoch, over all ranks together: each example exactly once (or counted as dropped), no batch
over budget, the same number of steps on every rank; feasibility over ranks is decided once (no epoch
raises because of its shuffle); deterministic per (seed, epoch); resumable mid-epoch, `load_state_dict`
atomic; bad arguments refused. The packing itself: test_bins.py; the lengths it reads: test_lengths.py.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from packcollate import PackedCollator
from packcollate.batching.bins import STRATEGIES
from packcollate.batching.sampler import TokenBudgetBatchSampler
from packcollate.errors import InputError
from tests.helpers import PROPERTY, all_ranks, flan_like

# ---------------------------------------------------------------------------------------------
# the guarantees, over random lengths, budgets, ranks, strategies, seeds
# ---------------------------------------------------------------------------------------------


@PROPERTY
@given(
    lengths=st.lists(st.integers(1, 120), min_size=1, max_size=150),
    max_tokens=st.integers(1, 300),
    num_replicas=st.integers(1, 6),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 3),
    shuffle=st.booleans(),
    window=st.integers(1, 64),
)
def test_every_example_once_within_budget_equal_steps(
    lengths, max_tokens, num_replicas, strategy, seed, epoch, shuffle, window
):
    assume(len(lengths) >= num_replicas)
    kwargs = dict(strategy=strategy, seed=seed, shuffle=shuffle, window=window, overflow="own_batch")
    packed_alone = TokenBudgetBatchSampler(lengths, max_tokens, num_replicas=1, **kwargs)
    packed_alone.set_epoch(epoch)
    bins = len(packed_alone)  # packing does not depend on num_replicas, only the final split does
    try:
        samplers = [
            TokenBudgetBatchSampler(lengths, max_tokens, num_replicas=num_replicas, rank=r, **kwargs)
            for r in range(num_replicas)
        ]
    except ValueError as error:
        # splitting bins can reach at most one example per bin: only merging bins within the budget
        # can make equal counts; when no packing can, the constructor says so (up front, not at an epoch)
        assert len(lengths) < math.ceil(bins / num_replicas) * num_replicas
        assert "merging" in str(error) and "use drop_last=True" in str(error)
        return
    for sampler in samplers:
        sampler.set_epoch(epoch)
    per_rank = [list(sampler) for sampler in samplers]
    assert {len(batches) for batches in per_rank} == {len(samplers[0])}
    flat = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert flat == list(range(len(lengths)))
    for batches in per_rank:
        for batch in batches:
            assert batch
            tokens = sum(lengths[i] for i in batch)
            assert tokens <= max_tokens or (len(batch) == 1 and lengths[batch[0]] > max_tokens)
    assert samplers[0].oversized_examples == sum(length > max_tokens for length in lengths)
    assert samplers[0].dropped_examples == 0
    tokens = samplers[0].step_tokens()
    assert tokens.shape == (len(samplers[0]), num_replicas)
    assert tokens.sum() == sum(lengths)
    assert 0 <= samplers[0].rank_imbalance() <= 1


@PROPERTY
@given(
    lengths=st.lists(st.integers(1, 100), min_size=1, max_size=120),
    max_tokens=st.integers(100, 300),
    num_replicas=st.integers(1, 6),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 1000),
)
def test_drop_last_reports_what_it_drops(lengths, max_tokens, num_replicas, strategy, seed):
    assume(len(lengths) >= num_replicas)
    bins = len(TokenBudgetBatchSampler(lengths, max_tokens, strategy=strategy, seed=seed))
    kwargs = dict(strategy=strategy, seed=seed, drop_last=True)
    if bins < num_replicas:  # too few batches to drop any: they are split up to one per rank
        per_rank = all_ranks(lengths, max_tokens, num_replicas, **kwargs)
        assert [len(batches) for batches in per_rank] == [1] * num_replicas
        assert sorted(i for batches in per_rank for batch in batches for i in batch) == list(range(len(lengths)))
        return
    per_rank = all_ranks(lengths, max_tokens, num_replicas, **kwargs)
    sampler = TokenBudgetBatchSampler(lengths, max_tokens, num_replicas=num_replicas, **kwargs)
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert len(flat) == len(set(flat))
    assert len(flat) + sampler.dropped_examples == len(lengths)
    assert len(sampler) == bins // num_replicas
    assert all(len(batches) == len(sampler) for batches in per_rank)


def all_ranks_at_epoch(lengths, max_tokens, num_replicas, epoch, **kwargs):
    per_rank = []
    for rank in range(num_replicas):
        sampler = TokenBudgetBatchSampler(lengths, max_tokens, num_replicas=num_replicas, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    return per_rank


def test_drop_last_seven_ranks_plans_every_epoch():
    """The audit's case: epochs 0-1 planned, epoch 2 packed only 6 batches for 7 ranks and raised."""
    lengths = [31, 10, 29, 25, 26, 17, 30, 5]
    for epoch in range(6):
        per_rank = all_ranks_at_epoch(lengths, 32, 7, epoch, seed=1, drop_last=True, strategy="greedy")
        assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) >= 1
        flat = [i for batches in per_rank for batch in batches for i in batch]
        assert len(flat) == len(set(flat))
        assert all(sum(lengths[i] for i in batch) <= 32 for batches in per_rank for batch in batches)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=40),
    max_tokens=st.integers(1, 80),
    num_replicas=st.integers(2, 8),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 50),
    drop_last=st.booleans(),
    window=st.sampled_from([1, 3, 4096]),
)
def test_feasibility_does_not_depend_on_the_epoch(lengths, max_tokens, num_replicas, strategy, seed, drop_last,
                                                 window):
    """Either the constructor refuses the configuration, or every epoch plans (drop_last: always)."""
    if len(lengths) < num_replicas:
        return
    kwargs = dict(strategy=strategy, seed=seed, drop_last=drop_last, window=window, overflow="own_batch")
    try:
        sampler = TokenBudgetBatchSampler(lengths, max_tokens, num_replicas=num_replicas, **kwargs)
    except ValueError as error:
        assert not drop_last, "drop_last=True always has a plan (n >= num_replicas)"
        assert "use drop_last=True" in str(error)
        return
    for epoch in range(5):
        sampler.set_epoch(epoch)
        steps = len(sampler)  # raises on today's main for some epochs only
        tokens = sampler.step_tokens()
        assert tokens.shape == (steps, num_replicas)
        plan = sampler.plan()
        kept = np.sort(plan.items)
        assert len(kept) + plan.dropped_examples == len(lengths) and len(np.unique(kept)) == len(kept)
        assert ((plan.tokens <= max_tokens) | (np.diff(plan.bounds) == 1)).all()


def test_fewer_examples_than_ranks():
    with pytest.raises(ValueError, match=r"num_replicas=4: expected at least that many examples.*got 3"):
        TokenBudgetBatchSampler([5, 6, 7], 100, num_replicas=4)


# ---------------------------------------------------------------------------------------------
# determinism, epochs, resume
# ---------------------------------------------------------------------------------------------


def test_deterministic_per_seed_and_epoch():
    lengths = flan_like(3000)
    a = TokenBudgetBatchSampler(lengths, 4096, seed=7)
    b = TokenBudgetBatchSampler(lengths, 4096, seed=7)
    first = list(a)
    assert first == list(b) == list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first
    assert sorted(i for batch in second for i in batch) == list(range(3000))
    a.set_epoch(0)
    assert list(a) == first
    assert list(TokenBudgetBatchSampler(lengths, 4096, seed=8)) != first


def test_shuffle_keeps_randomness_across_steps():
    """Steps are not sorted by length: an example's position in the epoch ignores its length."""
    lengths = flan_like(5000)
    batches = list(TokenBudgetBatchSampler(lengths, 4096, seed=0))
    position = np.concatenate([np.full(len(batch), step) for step, batch in enumerate(batches)])
    order = np.concatenate(batches)
    rank = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable")  # noqa: E731
    spearman = np.corrcoef(rank(position), rank(lengths[order]))[0, 1]
    assert abs(spearman) < 0.1


def test_no_shuffle_is_seed_independent_and_follows_dataset_order():
    lengths = flan_like(3000)
    a = list(TokenBudgetBatchSampler(lengths, 4096, shuffle=False, seed=1, window=500))
    b = list(TokenBudgetBatchSampler(lengths, 4096, shuffle=False, seed=2, window=500))
    assert a == b
    # windows are packed in order: the first batches hold the first window's examples
    assert max(a[0]) < 500 and max(a[1]) < 500


def test_len_is_exact_on_every_rank():
    lengths = flan_like(2000)
    for num_replicas in (1, 3, 8):
        samplers = [
            TokenBudgetBatchSampler(lengths, 2048, num_replicas=num_replicas, rank=r) for r in range(num_replicas)
        ]
        assert all(len(s) == len(list(s)) == len(samplers[0]) for s in samplers)


def test_resume_mid_epoch_yields_exactly_the_rest():
    lengths = flan_like(3000)
    sampler = TokenBudgetBatchSampler(lengths, 2048, num_replicas=2, rank=1, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    seen = list(itertools.islice(iter(sampler), 7))
    state = sampler.state_dict()
    assert state == {"epoch": 2, "seed": 5, "batches_yielded": 7, "num_replicas": 2}

    resumed = TokenBudgetBatchSampler(lengths, 2048, num_replicas=2, rank=1, seed=999)  # the state restores the seed
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calling set_epoch with the same epoch keeps the resume
    rest = list(resumed)
    assert seen + rest == full
    assert resumed.state_dict()["batches_yielded"] == len(resumed)
    assert list(resumed) == full  # the next pass starts the epoch at 0 again
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # a different epoch drops the pending resume
    assert len(list(resumed)) == len(resumed)


def test_load_state_dict_rejects_bad_states():
    sampler = TokenBudgetBatchSampler(flan_like(500), 2048, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="expected the keys epoch, seed, batches_yielded"):
        sampler.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="expected num_replicas=2"):
        sampler.load_state_dict({"epoch": 0, "seed": 0, "batches_yielded": 0, "num_replicas": 4})
    with pytest.raises(ValueError, match=r"batches_yielded: expected an int in \[0, \d+\], got 100000"):
        sampler.load_state_dict({"epoch": 0, "seed": 0, "batches_yielded": 100000})


def test_load_state_dict_is_atomic():
    lengths = np.random.default_rng(0).integers(1, 200, 300)
    sampler = TokenBudgetBatchSampler(lengths, 1000, seed=3)
    sampler.set_epoch(1)
    before = (sampler.epoch, sampler.seed, sampler.state_dict())
    bad_states = [
        {"epoch": 4, "seed": 9, "batches_yielded": 10**6},  # refused after epoch and seed used to be applied
        {"epoch": 4, "seed": -5, "batches_yielded": 0},
        {"epoch": -1, "seed": 9, "batches_yielded": 0},
        {"epoch": 4, "seed": 9, "batches_yielded": True},
        {"epoch": 4, "seed": "9", "batches_yielded": 0},
    ]
    for state in bad_states:
        with pytest.raises(ValueError):
            sampler.load_state_dict(state)
        assert (sampler.epoch, sampler.seed, sampler.state_dict()) == before
    assert len(list(sampler)) == len(sampler)  # still usable


def test_a_negative_seed_in_a_state_is_refused_and_the_sampler_stays_usable():
    sampler = TokenBudgetBatchSampler([5, 6, 7, 8], 12, seed=0)
    with pytest.raises(ValueError, match=r"state\['seed'\]: expected a non-negative int, got -5"):
        sampler.load_state_dict({"epoch": 0, "seed": -5, "batches_yielded": 0})
    assert sorted(i for batch in sampler for i in batch) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# long examples, bad input
# ---------------------------------------------------------------------------------------------


def test_overflow_error_names_index_and_length():
    with pytest.raises(ValueError, match=r"example 2: expected at most max_tokens=100 tokens, got 150"):
        TokenBudgetBatchSampler([10, 20, 150, 30, 200], 100)


def test_overflow_own_batch():
    lengths = [10, 20, 150, 30, 200, 40]
    sampler = TokenBudgetBatchSampler(lengths, 100, overflow="own_batch")
    assert sampler.oversized_examples == 2
    batches = list(sampler)
    assert [2] in batches and [4] in batches
    assert sorted(i for batch in batches for i in batch) == list(range(6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens: expected a positive int, got 0"),
        ({"strategy": "best"}, r"strategy: expected one of \('bfd', 'ffd', 'greedy'\), got 'best'"),
        ({"overflow": "drop"}, r"overflow: expected one of \('error', 'own_batch'\), got 'drop'"),
        ({"window": 0}, "window: expected a positive int, got 0"),
        ({"num_replicas": 2, "rank": 2}, r"rank: expected an int in \[0, num_replicas=2\), got 2"),
        ({"seed": -1}, "seed: expected a non-negative int, got -1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenBudgetBatchSampler([5, 6, 7], **{"max_tokens": 100, **kwargs})


def test_set_epoch_rejects_negative():
    with pytest.raises(ValueError, match="epoch: expected a non-negative int, got -1"):
        TokenBudgetBatchSampler([5, 6], 100).set_epoch(-1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TokenBudgetBatchSampler([5, 6, 7], 0),
        lambda: TokenBudgetBatchSampler([5, 6, 7], 100, strategy="best"),
        lambda: TokenBudgetBatchSampler([5, 6, 7], 100, num_replicas=2, rank=2),
        lambda: TokenBudgetBatchSampler([10] * 5, 10, num_replicas=4),
        lambda: TokenBudgetBatchSampler([3, 0], 100),
        lambda: TokenBudgetBatchSampler([5, 6], 100).load_state_dict({"epoch": 0}),
    ],
)
def test_bad_input_is_an_input_error(make):
    """Refusals are `packcollate.errors.InputError` (a ValueError, so `except ValueError` still catches them)."""
    with pytest.raises(InputError):
        make()


# ---------------------------------------------------------------------------------------------
# inputs and integration
# ---------------------------------------------------------------------------------------------


def test_distributed_defaults(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    sampler = TokenBudgetBatchSampler(flan_like(100), 1024)
    assert (sampler.num_replicas, sampler.rank) == (4, 3)


def test_dataloader_with_packed_collator():
    lengths = flan_like(400, seed=1)
    dataset = [{"input_ids": list(range(length))} for length in lengths]
    sampler = TokenBudgetBatchSampler(lengths, 2048, num_replicas=2, rank=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PackedCollator())
    batches = list(loader)
    assert len(batches) == len(sampler)
    for batch, indices in zip(batches, sampler):
        assert batch["input_ids"].shape == (1, int(lengths[indices].sum()))
        assert batch["input_ids"].shape[1] <= 2048
        assert len(batch["cu_seq_lens_q"]) == len(indices) + 1


def test_dataloader_own_batch_is_truncated_by_the_collator():
    lengths = [30, 500, 40, 50]
    dataset = [{"input_ids": list(range(length))} for length in lengths]
    sampler = TokenBudgetBatchSampler(lengths, 128, overflow="own_batch")
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PackedCollator(max_seq_length=128))
    assert all(batch["input_ids"].shape[1] <= 128 for batch in loader)


# ---------------------------------------------------------------------------------------------
# quality on a realistic distribution (no timing)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["bfd", "ffd"])
def test_fill_and_balance_on_flan_like_lengths(strategy):
    sampler = TokenBudgetBatchSampler(flan_like(40_000), 16384, num_replicas=8, strategy=strategy)
    tokens = sampler.step_tokens()
    assert tokens.sum() / (tokens.size * 16384) >= 0.98
    assert sampler.rank_imbalance() < 0.05
