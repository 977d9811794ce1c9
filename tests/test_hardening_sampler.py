"""Reliability of the token-budget sampler and the loops: feasibility over ranks is decided once (no
epoch raises because of its shuffle), `load_state_dict` is atomic, bad arguments are refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate.batching.bins import STRATEGIES
from packcollate.batching.sampler import TokenBudgetBatchSampler
from packcollate.integrations.loops import micro_batches


def all_ranks(lengths, max_tokens, num_replicas, epoch, **kwargs):
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
        per_rank = all_ranks(lengths, 32, 7, epoch, seed=1, drop_last=True, strategy="greedy")
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


@pytest.mark.parametrize("lengths, index", [([3, True], 1), ([False, 4], 0), ((2, 3, True), 2)])
def test_bool_lengths_are_refused(lengths, index):
    with pytest.raises(ValueError, match=rf"lengths\[{index}\]: expected a positive int, got (True|False)"):
        TokenBudgetBatchSampler(lengths, 10)


@pytest.mark.parametrize("steps", [2.5, 1.0, True, "2", 0, -1])
def test_micro_batches_refuses_a_non_integer_step_count(steps):
    with pytest.raises(ValueError, match="accumulation_steps: expected a positive int"):
        list(micro_batches([{"x": 1}, {"x": 2}, {"x": 3}], steps))


def test_micro_batches_groups_by_an_integer():
    assert [len(step) for step in micro_batches(range(5), np.int64(2))] == [2, 2, 1]
