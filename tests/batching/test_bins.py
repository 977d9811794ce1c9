"""Bins of whole examples within a token budget (`packcollate.batching.bins`), through the sampler that plans with
them: the packing equals a plain reference best/first-fit decreasing and greedy fill, and equal bin counts over
ranks come from repacking, splitting or merging bins, never from duplicating an example (or are refused, or
dropped with `drop_last`)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from packcollate.batching.bins import STRATEGIES
from packcollate.batching.sampler import TokenBudgetBatchSampler
from tests.helpers import PROPERTY, all_ranks

# ---------------------------------------------------------------------------------------------
# reference implementations: one item at a time, plain Python
# ---------------------------------------------------------------------------------------------


def reference_fit(lengths, capacity, best_fit):
    """Bins (lists of indices, in opening order) of best/first-fit decreasing; ties to the first bin."""
    bins, space = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if space[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (space[b], b)) if best_fit else fits[0]
        else:
            b = len(bins)
            bins.append([])
            space.append(capacity)
        bins[b].append(i)
        space[b] -= lengths[i]
    return [sorted(b) for b in bins]


def reference_greedy(lengths, capacity):
    bins, total = [[]], 0
    for i, length in enumerate(lengths):
        if bins[-1] and total + length > capacity:
            bins.append([])
            total = 0
        bins[-1].append(i)
        total += length
    return bins


@PROPERTY
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=80),
    max_tokens=st.integers(60, 200),
    strategy=st.sampled_from(STRATEGIES),
)
def test_packing_equals_reference(lengths, max_tokens, strategy):
    """One window, one rank, no shuffling: exactly the textbook algorithm, bins in opening order."""
    sampler = TokenBudgetBatchSampler(lengths, max_tokens, shuffle=False, strategy=strategy, window=len(lengths))
    got = [sorted(batch) for batch in sampler]
    if strategy == "greedy":
        expected = reference_greedy(lengths, max_tokens)
    else:
        expected = reference_fit(lengths, max_tokens, best_fit=strategy == "bfd")
    assert got == expected


# ---------------------------------------------------------------------------------------------
# equal counts over ranks
# ---------------------------------------------------------------------------------------------


def test_equal_counts_by_repacking_not_duplicating():
    """37 examples filling 9 bins, 4 ranks: 12 batches, every example once, none dropped."""
    lengths = [100] * 36 + [50]
    per_rank = all_ranks(lengths, 400, 4, seed=3)
    assert [len(b) for b in per_rank] == [3, 3, 3, 3]
    flat = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert flat == list(range(37))


def test_split_fallback_when_even_dealing_exceeds_the_budget(monkeypatch):
    """Repacking the smallest bins evenly overflows here; halving the fullest bins still works."""
    import packcollate.batching.bins as bins_module

    calls = []
    split = bins_module._split_halves
    monkeypatch.setattr(bins_module, "_split_halves", lambda *a: calls.append(1) or split(*a))
    lengths = [33, 5, 14, 28, 7, 18, 10, 7, 1, 20, 34, 32, 48, 6, 5, 4, 8, 23, 39, 31, 31, 13]
    per_rank = all_ranks(lengths, 48, 5, shuffle=False)
    assert calls
    assert len({len(batches) for batches in per_rank}) == 1
    flat = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in batch) <= 48 for batches in per_rank for batch in batches)


def test_merge_fallback_when_too_few_examples_fit_to_split(monkeypatch):
    """Splitting cannot reach a multiple of the ranks here (window 1 leaves many tiny bins); merging
    bins within the budget does."""
    import packcollate.batching.bins as bins_module

    calls = []
    merged = bins_module._merged
    monkeypatch.setattr(bins_module, "_merged", lambda *a: calls.append(1) or merged(*a))
    lengths = [8, 1, 5, 1, 9, 3, 2, 4, 4, 8, 9, 5, 6, 7, 5, 2, 5, 6, 9, 3, 1, 7, 9, 2, 5, 3, 8, 9, 5, 7, 8, 7, 1,
               6, 4, 4, 7, 4]
    per_rank = all_ranks(lengths, 9, 4, shuffle=True, seed=2, strategy="ffd", window=1)
    assert calls
    assert len({len(batches) for batches in per_rank}) == 1
    flat = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in batch) <= 9 for batches in per_rank for batch in batches)


def test_impossible_equal_counts_raise_and_drop_last_drops():
    lengths = [10] * 5  # each example fills a batch: 5 batches cannot be shared by 4 ranks
    with pytest.raises(ValueError, match=r"num_replicas=4.*5 batches.*use drop_last=True"):
        TokenBudgetBatchSampler(lengths, 10, num_replicas=4)
    sampler = TokenBudgetBatchSampler(lengths, 10, num_replicas=4, drop_last=True)
    assert len(sampler) == 1
    assert sampler.dropped_examples == 1
