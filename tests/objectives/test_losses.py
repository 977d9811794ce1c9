"""The sequence-weighted loss (`packcollate.objectives.losses`): every example weighs the same, however long.

The packed loss and gradients equal the padded reference — the mean over examples of each example's mean
token loss — in a plain loop split into micro-batches; each example's loss is its own token mean (not the
model's token mean), and an example without targets weighs nothing. In `PackedTrainer(loss_weighting="sequence")`:
integrations/test_loss_weighting.py.
"""

import pytest
import torch

from packcollate import PackedCollator
from packcollate.objectives.losses import (
    count_loss_examples,
    per_example_token_loss,
    sequence_weighted_loss,
    summed_token_loss,
)
from tests.helpers import assert_same_change_within_an_ulp as assert_same_change
from tests.helpers import padded_reference_change, prompt_completion_dataset, tiny_model

torch.set_num_threads(1)


def test_plain_loop_micro_batches_equal_padded():
    dataset = prompt_completion_dataset(n=12)
    expected, expected_loss = padded_reference_change(dataset)
    model = tiny_model()
    rows = [{"input_ids": i, "completion_mask": m} for i, m in zip(dataset["input_ids"], dataset["completion_mask"])]
    collator = PackedCollator()
    step = [collator(rows[:5]), collator(rows[5:9]), collator(rows[9:])]
    n = count_loss_examples(step)
    assert n == 12
    total = 0.0
    for batch in step:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = sequence_weighted_loss(logits, batch["labels"], batch["cu_seq_lens_q"], n)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(expected_loss, rel=1e-5)
    assert_same_change(expected, {n: -p.grad for n, p in model.named_parameters()})


def test_per_example_loss_is_each_examples_mean_and_weights_differ_from_token_mean():
    dataset = prompt_completion_dataset(n=6)
    model = tiny_model()
    rows = [{"input_ids": i, "completion_mask": m} for i, m in zip(dataset["input_ids"], dataset["completion_mask"])]
    batch = PackedCollator()(rows)
    with torch.no_grad():
        out = model(**batch)
        per_example = per_example_token_loss(out.logits, batch["labels"], batch["cu_seq_lens_q"])
        for row, value in zip(rows, per_example):
            ids = torch.tensor(row["input_ids"])
            labels = ids.masked_fill(torch.tensor(row["completion_mask"]) == 0, -100)
            assert value.item() == pytest.approx(model(input_ids=ids[None], labels=labels[None]).loss.item(), rel=1e-5)
        # the model's token mean weighs each example by its targets; the sequence mean does not
        targets = torch.tensor([sum(m[1:]) for m in (r["completion_mask"] for r in rows)], dtype=torch.float)
        assert out.loss.item() == pytest.approx(((per_example * targets).sum() / targets.sum()).item(), rel=1e-5)
        assert abs(per_example.mean().item() - out.loss.item()) > 1e-3


def test_example_without_targets_weighs_nothing():
    logits = torch.randn(1, 7, 5)
    labels = torch.tensor([[-100, 1, 2, -100, -100, -100, 3]])
    cu = torch.tensor([0, 3, 5, 7], dtype=torch.int32)  # example 1 has no target
    per_example = per_example_token_loss(logits, labels, cu)
    assert per_example[1] == 0
    assert sequence_weighted_loss(logits, labels, cu) == pytest.approx((per_example[0] + per_example[2]).item() / 2)


def test_a_label_minus_one_is_refused_not_trained_as_token_zero():
    """[17] H3: `loss_weighting="sequence"`'s loss read a label -1 as token 0."""
    logits = torch.randn(1, 5, 11)
    labels = torch.tensor([[-100, 3, -1, -100, 4]])
    with pytest.raises(ValueError, match="got -1 at token 2"):
        sequence_weighted_loss(logits, labels, torch.tensor([0, 3, 5]))


@pytest.mark.parametrize("num_examples", [0, -1, 1.5, torch.tensor(-2)])
def test_num_examples_below_this_batchs_examples_is_refused(num_examples):
    """[17]: num_examples=0 gave inf/NaN, -1 flipped the loss's sign, 1.5 was accepted."""
    logits = torch.randn(1, 5, 11)
    labels = torch.tensor([[-100, 3, 2, -100, 4]])
    with pytest.raises(ValueError, match="num_examples: expected an int >= 2"):
        sequence_weighted_loss(logits, labels, torch.tensor([0, 3, 5]), num_examples)
    no_targets = torch.full((1, 5), -100)
    assert sequence_weighted_loss(logits, no_targets, torch.tensor([0, 3, 5]), 0).item() == 0.0


def test_summed_token_loss_of_a_packed_row_is_the_sum_over_its_examples():
    """open-instruct's `--reduce_loss sum` on one packed row == the summed loss of each example alone (padded rows),
    forward and backward; no prediction crosses an example boundary."""
    from packcollate import PaddedCollator

    dataset = prompt_completion_dataset(n=6)
    rows = [{"input_ids": i, "completion_mask": m} for i, m in zip(dataset["input_ids"], dataset["completion_mask"])]
    packed_model, padded_model = tiny_model(), tiny_model("eager")
    batch = PackedCollator()(rows)
    packed = summed_token_loss(packed_model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
    padded = PaddedCollator()(rows)
    alone = summed_token_loss(padded_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                              padded["labels"])
    assert packed.item() == pytest.approx(alone.item(), rel=1e-6)
    packed.backward()
    alone.backward()
    for (name, p), q in zip(packed_model.named_parameters(), padded_model.parameters()):
        assert float((p.grad - q.grad).norm() / q.grad.norm()) < 1e-5, name
    with pytest.raises(ValueError, match=r"labels: expected shape \(1, 5\)"):
        summed_token_loss(torch.zeros(1, 5, 3), torch.zeros(1, 4, dtype=torch.long))
