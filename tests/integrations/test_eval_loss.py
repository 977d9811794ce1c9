"""The evaluation loss (`packcollate.integrations.eval_loss`): the token mean over every target of the eval set,
whatever the batching.

Padded fixed batches, packed fixed batches and token-budget batches agree to 1e-6 with a one-example-at-
a-time reference (on main a token budget changed it); a batch whose targets truncation removed adds
nothing (on main: NaN); `overflow="drop"` leaving a batch empty evaluates (on main: ValueError mid-evaluation).
"""

import numpy as np
import torch

import packcollate  # noqa: F401
from packcollate import PackedCollator, PaddedCollator
from packcollate.integrations import PackedTrainer
from tests.helpers import (
    arguments,
    long_prompt_eval_set,
    prompt_completion_dataset,
    tiny_model,
)

torch.set_num_threads(1)


def reference_eval_loss(dataset, collator) -> float:
    """Sum of every example's token losses / all targets, one example at a time (no batching at all)."""
    model = tiny_model().eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            row = {k: v for k, v in dataset[i].items() if k != "idx"}
            batch = collator([row])
            n = int((batch["labels"][..., 1:] != -100).sum())
            if n:
                total += float(model(**batch).loss) * n
                targets += n
    return total / targets


def eval_loss(tmp_path, dataset, collator=None, **options) -> float:
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path, per_device_eval_batch_size=4),
                            eval_dataset=dataset, data_collator=collator, check_packing=False, **options)
    return trainer.evaluate()["eval_loss"]


def test_eval_loss_is_the_token_mean_whatever_the_batching(tmp_path):
    dataset = prompt_completion_dataset(n=12, seed=2)
    reference = reference_eval_loss(dataset, PackedCollator())
    losses = {
        "padded, 4 per batch": eval_loss(tmp_path, dataset, PaddedCollator()),
        "packed, 4 per batch": eval_loss(tmp_path, dataset),
        "token budget 120": eval_loss(tmp_path, dataset, eval_max_tokens_per_batch=120),
        "token budget 60": eval_loss(tmp_path, dataset, eval_max_tokens_per_batch=60),
        "stream, budget 120": eval_loss(tmp_path, dataset.to_iterable_dataset(), eval_max_tokens_per_batch=120),
    }
    for name, loss in losses.items():
        assert abs(loss - reference) < 1e-6, (name, loss, reference)


def test_a_batch_without_targets_adds_nothing(tmp_path, caplog):
    """max_seq_length=64 cuts the long examples inside their prompt: those batches have no target."""
    dataset = long_prompt_eval_set()
    collator = PackedCollator(max_seq_length=64)
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path, per_device_eval_batch_size=1),
                            eval_dataset=dataset, data_collator=collator, check_packing=False)
    with caplog.at_level("WARNING", logger="packcollate"):
        loss = trainer.evaluate()["eval_loss"]
    assert np.isfinite(loss)
    assert abs(loss - reference_eval_loss(dataset, PackedCollator(max_seq_length=64))) < 1e-6
    assert "2 batches had no targets" in caplog.text


def test_overflow_drop_evaluates_without_the_dropped_examples(tmp_path):
    dataset = long_prompt_eval_set()
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path, per_device_eval_batch_size=1),
                            eval_dataset=dataset, data_collator=PackedCollator(max_seq_length=64, overflow="drop"),
                            check_packing=False)
    loss = trainer.evaluate()["eval_loss"]
    kept = dataset.filter(lambda row: len(row["input_ids"]) <= 64)
    assert len(kept) == 6
    assert abs(loss - reference_eval_loss(kept, PackedCollator())) < 1e-6


def test_packed_eval_loss_equals_padded(tmp_path):
    """Both the token mean over the eval set (the plain Trainer weighs each batch by its rows instead:
    tests/test_eval_lengths.py)."""
    eval_set = prompt_completion_dataset(n=8, seed=1)
    packed = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), eval_dataset=eval_set, check_packing=False)
    padded = PackedTrainer(model=tiny_model("sdpa"), args=arguments(tmp_path, remove_unused_columns=False),
                           eval_dataset=eval_set, data_collator=PaddedCollator(passthrough_keys=["idx"]),
                           check_packing=False)
    assert abs(packed.evaluate()["eval_loss"] - padded.evaluate()["eval_loss"]) < 1e-5
