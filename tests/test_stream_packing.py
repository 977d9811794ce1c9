"""Token-budget batches from a stream (`TokenBudgetStream`) and iterable datasets in `PackedTrainer`.

Invariants (hypothesis, over ranks simulated in one process): every example exactly once, no
batch over the budget, the same number of batches on every rank, padding batches without targets,
a resumed pass equal to the rest of the uninterrupted one. Then the Trainer: a stream trains to
exactly the padded weight change (it crashed on main: accelerate cut `cu_seq_lens` to `(1,)`, and
a token budget raised a pyarrow TypeError), and 2 ranks (torchrun, gloo) end a stream evenly.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader
from transformers import Trainer

from packcollate import PackedCollator
from packcollate.batching.stream import TokenBudgetStream
from packcollate.errors import InputError
from packcollate.integrations import PackedTrainer

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer_integration import (  # noqa: E402
    N_EXAMPLES,
    arguments,
    assert_same_change,
    padded_reference,  # noqa: F401  (fixture)
    prompt_completion_dataset,
    tiny_model,
)
from two_ranks import launch  # noqa: E402

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


@pytest.mark.parametrize("budget", [None, "tokens"])
def test_packed_trainer_on_a_stream_equals_padded(padded_reference, tmp_path, budget):  # noqa: F811
    """`Dataset.to_iterable_dataset()`: one accumulated step over the whole stream = the padded step."""
    dataset = prompt_completion_dataset()
    total = sum(len(x) for x in dataset["input_ids"])
    options = {"max_tokens_per_batch": total // 3 + 40} if budget else {}
    # the Trainer steps on a stream only after gradient_accumulation_steps batches: make them the whole stream
    counting = PackedTrainer(model=tiny_model(), args=arguments(tmp_path, per_device_train_batch_size=4, max_steps=1),
                             train_dataset=dataset.to_iterable_dataset(), check_packing=False, **options)
    n_batches = len(list(counting.get_train_dataloader()))
    assert n_batches > 1
    args = arguments(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=n_batches, max_steps=1)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PackedTrainer(model=model, args=args, train_dataset=dataset.to_iterable_dataset(), check_packing=False,
                            optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None), **options)
    trainer.train()
    assert trainer.state.global_step == 1
    assert_same_change(padded_reference, {n: p.detach() - before[n] for n, p in model.named_parameters()})


def test_generator_stream_and_iterable_eval(tmp_path):
    """A torch IterableDataset over a generator, for training and evaluation, with a token budget."""
    dataset = prompt_completion_dataset(n=24)
    rows = [dataset[i] for i in range(len(dataset))]

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from (dict(row) for row in rows)

    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path, max_steps=3), train_dataset=Rows(),
                            eval_dataset=Rows(), max_tokens_per_batch=150, check_packing=False)
    trainer.train()
    assert trainer.state.global_step == 3
    padded = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), eval_dataset=dataset, check_packing=False)
    streamed = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), eval_dataset=Rows(),
                             max_tokens_per_batch=150, check_packing=False)
    assert abs(streamed.evaluate()["eval_loss"] - padded.evaluate()["eval_loss"]) < 1e-6


def test_plain_trainer_on_a_stream_names_dispatch_batches(tmp_path):
    trainer = Trainer(model=tiny_model(), args=arguments(tmp_path), data_collator=PackedCollator(),
                      train_dataset=prompt_completion_dataset().remove_columns(["completion_mask", "idx"])
                      .to_iterable_dataset())
    with pytest.raises(ValueError, match=r"dispatch_batches.*PackedTrainer"):
        trainer.train()


def test_two_ranks_end_a_stream_evenly(padded_reference, tmp_path, free_port):  # noqa: F811
    """torchrun, gloo: the packer's batches with an all_reduce each (a hang fails the timeout), every
    example once over the ranks, and PackedTrainer on the stream changes the weights like padding."""
    out = tmp_path / "change.pt"
    launch("ddp_stream_step.py", str(out), port=free_port)
    saved = torch.load(out)
    assert saved["seen"] == list(range(N_EXAMPLES + 1))
    assert saved["steps"][0] == saved["steps"][1]
    assert saved["padding_batches"] >= 1  # the odd example count left one rank a padding batch
    assert_same_change(padded_reference, saved["change"])


def test_trainer_resumes_mid_stream(tmp_path):
    """4 steps on a stream, or 2 steps, a checkpoint, and 2 more from it: the same weights."""
    dataset = prompt_completion_dataset(n=48).to_iterable_dataset()

    def run(output, max_steps, resume=None):
        model = tiny_model()
        args = arguments(output, max_steps=max_steps, save_strategy="steps", save_steps=2, learning_rate=0.1,
                         per_device_train_batch_size=4)
        trainer = PackedTrainer(model=model, args=args, train_dataset=dataset, max_tokens_per_batch=150,
                                check_packing=False)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "half", 2)
    resumed = run(tmp_path / "half", 4, resume=str(tmp_path / "half" / "checkpoint-2"))
    assert_same_change(whole, resumed, rtol=1e-6)
