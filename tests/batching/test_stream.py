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


# [17]: resumes, lengths the budget trusted, and errors that surfaced deep


@pytest.mark.parametrize("key, value", [
    ("seed", "x"), ("seed", -1), ("seed", 1.7), ("seed", None), ("epoch", -1), ("epoch", 1.7),
    ("steps_yielded", None), ("steps_yielded", -2),
])
def test_load_state_dict_is_validated_and_atomic(key, value):
    """A bad value is named and nothing changes (`seed='x'` used to set the epoch, then raise)."""
    stream = TokenBudgetStream(stream_of([5] * 20), 10)
    before = stream.state_dict()
    with pytest.raises(InputError, match=f"state\\['{key}'\\]: expected a non-negative int, got {value!r}"):
        stream.load_state_dict({"epoch": 3, "seed": 1, "steps_yielded": 2, key: value})
    assert stream.state_dict() == before and stream._skip == 0


def test_steps_beyond_the_pass_are_refused():
    stream = TokenBudgetStream(stream_of([5] * 20), 10)
    steps = len(list(stream))
    state = {**stream.state_dict(), "steps_yielded": steps + 3}
    stream.load_state_dict(state)
    with pytest.raises(InputError, match=f"expected steps_yielded within the pass \\(epoch 0 has {steps} steps\\), got {steps + 3}"):
        list(stream)


@pytest.mark.parametrize("other", [{"max_tokens": 20}, {"buffer_size": 4}, {"strategy": "greedy"}, {"shuffle": False}])
def test_a_state_of_another_configuration_is_refused(other):
    """H5: a state saved by a stream of another budget resumed a different plan (29 examples never seen)."""
    examples = stream_of(np.random.default_rng(0).integers(1, 10, 60))
    options = {"max_tokens": 10, "buffer_size": 8}
    saved = TokenBudgetStream(examples, **options)
    batches = iter(saved)
    next(batches), next(batches)
    resumed = TokenBudgetStream(examples, **{**options, **other})
    with pytest.raises(InputError, match=f"state: expected a state of this stream's configuration .*got one saved with .*'{next(iter(other))}'"):
        resumed.load_state_dict(saved.state_dict())


def test_a_state_counted_in_a_worker_process_is_refused():
    """H5: with `num_workers=1` the state said 0 steps after 5 batches (the worker counted them)."""
    stream = TokenBudgetStream(stream_of([5] * 40), 10)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=1))
    for _ in range(5):
        next(loader)
    with pytest.raises(InputError, match="iterated in a DataLoader worker process"):
        stream.state_dict()
    del loader
    assert stream.state_dict_of(5)["steps_yielded"] == 5


def test_a_generator_stream_trains_its_pass_and_refuses_another():
    """H6: a generator yielded nothing in the next epoch, silently."""
    examples = stream_of([5] * 20)
    stream = TokenBudgetStream((example for example in examples), 10)
    assert sum(len(batch) for batch in stream) == 20
    stream.set_epoch(1)
    with pytest.raises(InputError, match="expected a re-iterable stream for another pass \\(epoch 1\\), got a one-shot generator"):
        list(stream)


def test_the_budget_counts_what_the_collator_packs():
    """H4: a `length` field of 1 on 100-token examples, and `(1, L)` ids (counted 1 by `len`), made batches of
    thousands of tokens under a budget of 100-200."""
    lying = [{"input_ids": [1] * 100, "length": 1}] * 40
    with pytest.raises(InputError, match="stream example 0, key 'length': expected the 100 tokens of its 'input_ids'"):
        list(TokenBudgetStream(lying, 200))
    for ids in (torch.ones(1, 60, dtype=torch.long), np.ones((1, 60), dtype=np.int64), [[1] * 60]):
        batches = list(TokenBudgetStream([{"input_ids": ids}] * 10, 100))
        assert [len(batch) for batch in batches] == [1] * 10


@pytest.mark.parametrize("example, message", [
    ({"length": 10**30}, "stream example 1, key 'length': expected at most 1099511627776 tokens, got 10{30}"),
    ({"input_ids": []}, "stream example 1, key 'input_ids': expected at least one token, got 0 tokens"),
    ({"input_ids": 7}, "stream example 1, key 'input_ids': expected a sequence of token ids, got int"),
])
def test_bad_lengths_are_named_with_their_key(example, message):
    with pytest.raises(InputError, match=message.replace("10{30}", "1" + "0" * 30)):
        list(TokenBudgetStream([{"length": 3}, example], 10 ** 6))


def test_an_example_over_the_budget_is_warned_about(caplog):
    stream = TokenBudgetStream(stream_of([3, 40, 50, 4]), 10, overflow="own_batch")
    with caplog.at_level("WARNING", logger="packcollate"):
        batches = list(stream)
    assert sorted(len(b[0]["input_ids"]) for b in batches if len(b) == 1 and len(b[0]["input_ids"]) > 10) == [40, 50]
    warnings = [r.getMessage() for r in caplog.records if "over the budget" in r.getMessage()]
    assert len(warnings) == 1 and "stream example 1: 40 tokens, over the budget max_tokens=10" in warnings[0]


@pytest.mark.parametrize("pair", [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]},
                                  {"chosen_ids": [2, 3], "rejected_ids": [3]}])
def test_preference_pairs_never_get_a_padding_copy(pair):
    """A rank left without a batch at the end gets a target-free copy; a preference pair's loss has no labels to
    mask, so the end is refused in one line (it raised `KeyError: 'input_ids'`)."""
    examples = [{**pair, "length": 3}]
    with pytest.raises(InputError, match="a rank is left without a batch, and its padding batch must have no targets"):
        all_ranks(examples, 2, max_tokens=10)
