"""The token-mean loss in plain PyTorch / accelerate loops (`packcollate.integrations.loops`): `count_label_tokens`
and `num_items_in_batch` give the padded gradient over micro-batches of different token counts; `micro_batches`
groups by a positive integer only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import packcollate  # noqa: F401
from packcollate import PackedCollator
from packcollate.integrations import count_label_tokens, micro_batches
from tests.helpers import (
    N_EXAMPLES,
    assert_same_change,
    prompt_completion_dataset,
    tiny_model,
)


def test_count_label_tokens_of_numpy_batches():
    batches = [PackedCollator(return_tensors="np")([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])] * 2
    count = count_label_tokens(batches)
    assert torch.is_tensor(count) and count.dtype == torch.int64 and int(count) == 2 * 3


@pytest.mark.parametrize("loop", ["torch", "accelerate"])
def test_plain_loop_helpers_give_the_padded_gradient(padded_reference, loop):
    """count_label_tokens + num_items_in_batch in a plain loop (or accelerate's, as in
    examples/accelerate_loop.py): micro-batches of 5, 5, 6 examples."""
    model = tiny_model()
    dataset = prompt_completion_dataset()
    features = [dataset[i] for i in range(N_EXAMPLES)]
    collator = PackedCollator(passthrough_keys=["idx"])
    loader = [collator(features[0:5]), collator(features[5:10]), collator(features[10:16])]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    backward, world = (lambda loss: loss.backward()), 1
    if loop == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        backward, world = accelerator.backward, accelerator.num_processes
    for step in micro_batches(loader, 3):
        n = count_label_tokens(step)
        for batch in step:
            batch = {k: v for k, v in batch.items() if k != "idx"}
            backward(model(**batch, num_items_in_batch=n).loss * world)
        optimizer.step()
    change = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert_same_change(padded_reference, change)


@pytest.mark.parametrize("steps", [2.5, 1.0, True, "2", 0, -1])
def test_micro_batches_refuses_a_non_integer_step_count(steps):
    with pytest.raises(ValueError, match="accumulation_steps: expected a positive int"):
        list(micro_batches([{"x": 1}, {"x": 2}, {"x": 3}], steps))


def test_micro_batches_groups_by_an_integer():
    assert [len(step) for step in micro_batches(range(5), np.int64(2))] == [2, 2, 1]
