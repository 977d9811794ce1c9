"""TokenBudgetBatchSampler: the guarantees of `packcollate.batching.sampler`, as properties and examples.

Every epoch, over all ranks together: each example exactly once (or counted as dropped), no batch
over budget, the same number of steps on every rank; deterministic per (seed, epoch); resumable
mid-epoch; the packing itself equals a plain reference best/first-fit decreasing and greedy fill.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from packcollate import PackedCollator
from packcollate.batching.bins import STRATEGIES
from packcollate.batching.sampler import TokenBudgetBatchSampler
from packcollate.errors import InputError

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def flan_like(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(120), 0.9, n)), 1, 1024).astype(np.int64)


def all_ranks(lengths, max_tokens, num_replicas, **kwargs) -> list[list[list[int]]]:
    """The batches of every rank, one sampler per rank as in a real DDP job."""
    return [
        list(TokenBudgetBatchSampler(lengths, max_tokens, num_replicas=num_replicas, rank=rank, **kwargs))
        for rank in range(num_replicas)
    ]


# --- reference implementations: one item at a time, plain Python --------------------------------


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


# --- the guarantees, over random lengths, budgets, ranks, strategies, seeds ----------------------


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


def test_fewer_examples_than_ranks():
    with pytest.raises(ValueError, match=r"num_replicas=4: expected at least that many examples.*got 3"):
        TokenBudgetBatchSampler([5, 6, 7], 100, num_replicas=4)


# --- determinism, epochs, resume -----------------------------------------------------------------


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


# --- long examples, bad input ----------------------------------------------------------------------


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
    "lengths, message",
    [
        ([3, 0, 4], r"lengths\[1\]: expected a positive int, got 0"),
        ([3, 4, -2], r"lengths\[2\]: expected a positive int, got -2"),
        ([3.0, 2.5], r"lengths\[1\]: expected a positive int, got 2.5"),
        ([3, None], r"lengths\[1\]: expected a positive int, got None"),
        (["3"], r"lengths\[0\]: expected a positive int, got '3'"),
        (np.array([True, False]), r"lengths\[0\]: expected a positive int, got True"),
        (np.array([1.0, np.nan]), r"lengths\[1\]: expected a positive int, got nan"),
        ([[1, 2], [3, 4]], r"expected a 1-D sequence of positive ints, got an array of shape \(2, 2\)"),
        ([], "expected at least one example, got an empty sequence"),
    ],
)
def test_bad_lengths(lengths, message):
    with pytest.raises(ValueError, match=message):
        TokenBudgetBatchSampler(lengths, 100)


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


# --- inputs and integration -----------------------------------------------------------------------


def test_length_containers_agree():
    datasets = pytest.importorskip("datasets")
    lengths = flan_like(1000)
    expected = list(TokenBudgetBatchSampler(lengths.tolist(), 2048))
    dataset = datasets.Dataset.from_dict({"length": lengths})
    for source in (lengths, torch.from_numpy(lengths), dataset["length"], dataset.with_format("torch")["length"]):
        assert list(TokenBudgetBatchSampler(source, 2048)) == expected


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


# --- quality on a realistic distribution (no timing) ---------------------------------------------


@pytest.mark.parametrize("strategy", ["bfd", "ffd"])
def test_fill_and_balance_on_flan_like_lengths(strategy):
    sampler = TokenBudgetBatchSampler(flan_like(40_000), 16384, num_replicas=8, strategy=strategy)
    tokens = sampler.step_tokens()
    assert tokens.sum() / (tokens.size * 16384) >= 0.98
    assert sampler.rank_imbalance() < 0.05
