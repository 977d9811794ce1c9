"""Iterable datasets in `PackedTrainer` (`packcollate.integrations.streams`): a stream trains to exactly the padded
weight change (it crashed on main: accelerate cut `cu_seq_lens` to `(1,)`, and a token budget raised a pyarrow
TypeError), evaluates, resumes mid-stream, and 2 ranks (torchrun, gloo) end a stream evenly; the plain
`Trainer` on a stream names `dispatch_batches`. The packer itself: batching/test_stream.py.
"""

import pytest
import torch
from transformers import Trainer

from packcollate import PackedCollator
from packcollate.integrations import PackedTrainer
from tests.helpers import (
    N_EXAMPLES,
    arguments,
    assert_same_change,
    prompt_completion_dataset,
    tiny_model,
)
from tests.scripts.two_ranks import launch

torch.set_num_threads(1)


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


@pytest.mark.parametrize("save_at", [4, 5])
def test_trainer_resumes_mid_stream_after_the_first_pass(tmp_path, save_at):
    """[17] H5: a checkpoint saved in a later pass over a stream resumed in the first pass's plan (the Trainer
    counts a stream's steps as one endless epoch): some batches were trained twice, others never. Saved at
    the end of a pass (4) or inside one (5); a checkpoint without the stream's position is refused."""
    dataset = prompt_completion_dataset(n=12).to_iterable_dataset()

    def run(output, max_steps, resume=None):
        model = tiny_model()
        args = arguments(output, max_steps=max_steps, save_strategy="steps", save_steps=save_at, learning_rate=0.1)
        trainer = PackedTrainer(model=model, args=args, train_dataset=dataset, max_tokens_per_batch=150,
                                check_packing=False)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    per_pass = len(list(PackedTrainer(model=tiny_model(), args=arguments(tmp_path, max_steps=1), train_dataset=dataset,
                                      max_tokens_per_batch=150, check_packing=False).get_train_dataloader()))
    assert per_pass == 2  # the checkpoint lies after the first pass: at the end of the second, or in the third
    whole = run(tmp_path / "whole", 8)
    run(tmp_path / "half", save_at)
    checkpoint = tmp_path / "half" / f"checkpoint-{save_at}"
    resumed = run(tmp_path / "half", 8, resume=str(checkpoint))
    assert_same_change(whole, resumed, rtol=1e-6)
    from packcollate.errors import InputError
    from packcollate.integrations.streams import STREAM_POSITION_FILE

    (checkpoint / STREAM_POSITION_FILE).unlink()
    with pytest.raises(InputError, match=f"expected {STREAM_POSITION_FILE} in .*pass ignore_data_skip=True"):
        run(tmp_path / "half", 8, resume=str(checkpoint))
