"""`TokenBudgetStream` (`packcollate.batching.stream`): token-budget batches from a stream, an online packer over a
bounded buffer.

Invariants (hypothesis, over ranks simulated in one process): every example exactly once, no
batch over the budget, the same number of batches on every rank, padding batches without targets,
a resumed pass equal to the rest of the uninterrupted one; bad input is named. Streams in `PackedTrainer`:
integrations/test_streams.py.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from packcollate import PackedCollator
from packcollate.batching.stream import TokenBudgetStream
from packcollate.errors import InputError
from tests.helpers import prompt_completion_dataset

torch.set_num_threads(1)


def stream_of(lengths):
    return [{"input_ids": [1] * int(n), "idx": i} for i, n in enumerate(lengths)]


def all_ranks(examples, num_replicas, **options):
    return [list(TokenBudgetStream(examples, num_replicas=num_replicas, rank=r, **options)) for r in range(num_replicas)]


def is_padding(batch):
    return all(all(label == -100 for label in example.get("labels", [0])) for example in batch)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 120), min_size=0, max_size=150),
    st.integers(60, 300),
    st.sampled_from([1, 4, 16, 64]),
    st.sampled_from([1, 2, 3, 4]),
    st.sampled_from(["bfd", "ffd", "greedy"]),
    st.booleans(),
)
def test_every_example_once_within_budget_equal_steps(lengths, budget, buffer_size, num_replicas, strategy, shuffle):
    examples = stream_of(lengths)
    options = dict(max_tokens=budget, buffer_size=buffer_size, strategy=strategy, shuffle=shuffle, overflow="own_batch")
    ranks = all_ranks(examples, num_replicas, **options)
    assert len({len(batches) for batches in ranks}) == 1  # the same number of steps on every rank
    real = [b for batches in ranks for b in batches if not is_padding(b)]
    assert sorted(e["idx"] for b in real for e in b) == list(range(len(lengths)))  # exactly once
    for batch in real:
        tokens = sum(len(e["input_ids"]) for e in batch)
        assert tokens <= budget or len(batch) == 1  # only an example over the budget is alone and over it
    padding = [b for batches in ranks for b in batches if is_padding(b)]
    assert all(len(b) == 1 for b in padding)
    assert len(padding) < num_replicas  # padding only ever completes the last step
    assert all_ranks(examples, num_replicas, **options) == ranks  # deterministic


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 80), min_size=1, max_size=120), st.integers(0, 40), st.sampled_from([1, 2, 3]))
def test_resume_mid_stream_gives_the_rest(lengths, stop, num_replicas):
    examples = stream_of(lengths)
    for rank in range(num_replicas):
        full = list(TokenBudgetStream(examples, 100, buffer_size=8, num_replicas=num_replicas, rank=rank, seed=3))
        first = TokenBudgetStream(examples, 100, buffer_size=8, num_replicas=num_replicas, rank=rank, seed=3)
        batches = iter(first)
        head = [next(batches) for _ in range(min(stop, len(full)))]
        state = first.state_dict()
        assert state["steps_yielded"] == len(head)
        resumed = TokenBudgetStream(examples, 100, buffer_size=8, num_replicas=num_replicas, rank=rank)
        resumed.load_state_dict(state)
        assert head + list(resumed) == full


def test_epochs_reshuffle_and_states_are_checked():
    examples = stream_of(np.random.default_rng(0).integers(1, 50, 200))
    stream = TokenBudgetStream(examples, 128, buffer_size=64)
    first = list(stream)
    stream.set_epoch(1)
    second = list(stream)
    assert first != second
    assert sorted(e["idx"] for b in second for e in b) == list(range(200))
    with pytest.raises(ValueError, match="expected num_replicas=1"):
        stream.load_state_dict({"epoch": 0, "seed": 0, "steps_yielded": 1, "num_replicas": 2})


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"stream example 2: expected at most max_tokens=10 tokens, got 11"):
        list(TokenBudgetStream(stream_of([3, 4, 11]), 10))
    with pytest.raises(ValueError, match=r"stream example 0: expected a 'length' or 'input_ids' key, got keys \['text'\]"):
        list(TokenBudgetStream([{"text": "hi"}], 10))
    with pytest.raises(ValueError, match="expected exactly one of max_tokens and max_examples"):
        TokenBudgetStream([], None)
    with pytest.raises(ValueError, match="expected at most 1 DataLoader worker, got num_workers=2"):
        list(DataLoader(TokenBudgetStream(stream_of([3] * 8), 10), batch_size=None, num_workers=2))
    for make in (lambda: TokenBudgetStream([], 0), lambda: TokenBudgetStream([], 10, overflow="drop"),
                 lambda: TokenBudgetStream([], 10, num_replicas=2, rank=2), lambda: list(TokenBudgetStream([{"length": 0}], 10)),
                 lambda: TokenBudgetStream([], 10).load_state_dict({"epoch": 0})):
        with pytest.raises(InputError):  # a ValueError too
            make()


def test_plain_loop_gives_whole_packed_batches():
    """The stream in a DataLoader (batch_size=None): every item a `(1, N)` row with `(k+1,)` cu_seq_lens."""
    dataset = prompt_completion_dataset(n=40).to_iterable_dataset()
    loader = DataLoader(TokenBudgetStream(dataset, 200, buffer_size=16), batch_size=None,
                        collate_fn=PackedCollator(passthrough_keys=["idx"]))
    batches = list(loader)
    assert sorted(i for b in batches for i in b["idx"].tolist()) == list(range(40))
    for batch in batches:
        assert batch["input_ids"].shape[1] <= 200
        assert batch["cu_seq_lens_q"].shape == (len(batch["idx"]) + 1,)


def test_count_batches_without_a_budget():
    ranks = all_ranks(stream_of([5] * 11), 2, max_tokens=None, max_examples=4, buffer_size=4, shuffle=False)
    sizes = [[len(b) for b in batches] for batches in ranks]
    assert all(max(s) <= 4 for s in sizes) and sum(map(sum, sizes)) == 11 and len(ranks[0]) == len(ranks[1])
