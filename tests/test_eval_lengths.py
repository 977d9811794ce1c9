"""Evaluation with PackedTrainer: the loss is the token mean of the eval set, long splits are found first.

- `eval_loss` is the mean over every target token of the eval set, whatever the batching: padded
  fixed batches, packed fixed batches and token-budget batches agree to 1e-6 with a one-example-at-
  a-time reference (on main a token budget changed it);
- a batch whose targets truncation removed adds nothing (on main: NaN); `overflow="drop"` leaving
  a batch empty evaluates (on main: ValueError mid-evaluation);
- before the first step every split is measured: a validation split longer than the training split
  is announced once with the `max_seq_length` that covers it, and an example longer than the
  model's positions is a ValueError before training (on main: an IndexError mid-run).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from packcollate import PackedCollator, PaddedCollator
from packcollate.integrations import PackedTrainer

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer_integration import arguments, prompt_completion_dataset, tiny_model  # noqa: E402

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


def long_prompt_eval_set():
    """8 eval examples of 300 tokens every 4th (prompt 100 tokens): cut at 64, two have no target left."""
    return prompt_completion_dataset(n=8, seed=1, long_every=4)


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


def test_a_validation_split_longer_than_training_is_announced_once(tmp_path, caplog):
    train = prompt_completion_dataset(n=16)  # at most 39 tokens
    longest_train = max(len(x) for x in train["input_ids"])
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=train,
                            eval_dataset={"val": long_prompt_eval_set(), "test": prompt_completion_dataset(n=4, seed=3)},
                            data_collator=PackedCollator(max_seq_length=longest_train), check_packing=False)
    with caplog.at_level("WARNING", logger="packcollate"):
        trainer.train()
        trainer.evaluate()
    announced = [r.getMessage() for r in caplog.records if "max_seq_length=300 covers every measured split" in r.getMessage()]
    assert len(announced) == 1, caplog.text
    assert f"eval 'val' split: 2 of 8 examples are longer than max_seq_length={longest_train} (longest 300" in announced[0]
    assert "train split" not in announced[0]


def test_an_example_longer_than_the_model_positions_fails_before_training(tmp_path):
    """GPT-2 (learned positions, n_positions=128): a 300-token eval example would IndexError mid-run."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=128),
                                             attn_implementation="packcollate")
    trainer = PackedTrainer(model=model, args=arguments(tmp_path), train_dataset=prompt_completion_dataset(),
                            eval_dataset=long_prompt_eval_set(), check_packing=False)
    with pytest.raises(ValueError, match=r"eval split, example 0: expected at most 128 tokens \(the model's "
                                         r"(n_positions|max_position_embeddings)\), "
                                         r"got 300 \(2 of 8 examples are longer\); give the collator max_seq_length=128"):
        trainer.train()
    assert trainer.state.global_step == 0
    fixed = PackedTrainer(model=model, args=arguments(tmp_path), train_dataset=prompt_completion_dataset(),
                          eval_dataset=long_prompt_eval_set(), data_collator=PackedCollator(max_seq_length=128),
                          check_packing=False)
    fixed.train()
    assert np.isfinite(fixed.evaluate()["eval_loss"])


def test_overflow_error_with_a_long_split_fails_before_training(tmp_path):
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=prompt_completion_dataset(),
                            eval_dataset=long_prompt_eval_set(),
                            data_collator=PackedCollator(max_seq_length=64, overflow="error"), check_packing=False)
    with pytest.raises(ValueError, match=r"eval split, example 0: expected at most max_seq_length=64 tokens, got 300"):
        trainer.train()
