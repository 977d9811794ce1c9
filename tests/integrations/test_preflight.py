"""Checks a trainer runs before its first step (`packcollate.integrations.preflight`), each given the trainer.

- Columns: the plain `Trainer` removes `completion_mask` (`remove_unused_columns=True`, the default) before
  the collator sees a row: a completion-only run would train on the prompt. `check_trainer_keeps_masks(trainer)`
  refuses such a trainer before its first step (PackedTrainer runs it at train and evaluation start; it is
  given the trainer, never finds one on the call stack); the setups that keep the mask, or say every token
  is trained on, pass.
- Lengths: before the first step every split is measured: a validation split longer than the training
  split is announced once with the `max_seq_length` that covers it, and an example longer than the
  model's positions is a ValueError before training (on main: an IndexError mid-run).
- Launch: FSDP asked for on CPU (accelerate would run DDP without a word) and an `accelerate launch` that
  starts fewer processes than asked for are refused, naming the fix.
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Trainer

import packcollate  # noqa: F401
from packcollate import PackedCollator, PaddedCollator
from packcollate.integrations import PackedTrainer
from packcollate.integrations.preflight import check_trainer_keeps_masks, removed_masks
from tests.helpers import (
    arguments,
    long_prompt_eval_set,
    prompt_completion_dataset,
    tiny_model,
)
from tests.scripts.two_ranks import launch

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Columns
# ---------------------------------------------------------------------------------------------


REFUSED = "expected the 'completion_mask' column of the training and evaluation dataset to reach the collator"


def targets(trainer) -> int:
    return sum(int((batch["labels"] != -100).sum()) for batch in trainer.get_train_dataloader())


def plain_trainer(tmp_path, collator=None, **options):
    return Trainer(model=tiny_model(), args=arguments(tmp_path, **options), data_collator=collator or PackedCollator(),
                   train_dataset=prompt_completion_dataset(), eval_dataset=prompt_completion_dataset(n=4, seed=1))


@pytest.mark.parametrize("collator", [PackedCollator(), PaddedCollator()])
def test_a_plain_trainer_that_removes_the_mask_is_refused(tmp_path, collator):
    trainer = plain_trainer(tmp_path, collator=collator)
    assert removed_masks(trainer) == {"training": ["completion_mask"], "evaluation": ["completion_mask"]}
    with pytest.raises(ValueError, match=REFUSED):
        check_trainer_keeps_masks(trainer)


class MaskDroppingTrainer(PackedTrainer):
    """A PackedTrainer subclass that goes back to the plain Trainer's kept columns."""

    def _set_signature_columns_if_needed(self):
        Trainer._set_signature_columns_if_needed(self)


@pytest.mark.parametrize("workers", [0, "fork", "spawn"])
def test_packed_trainer_runs_the_check_before_its_first_step(tmp_path, workers):
    options = {} if workers == 0 else dict(dataloader_num_workers=1, dataloader_multiprocessing_context=workers)
    def dropping(collator):
        return MaskDroppingTrainer(model=tiny_model(), args=arguments(tmp_path, **options), data_collator=collator,
                                   train_dataset=prompt_completion_dataset(),
                                   eval_dataset=prompt_completion_dataset(n=4, seed=1), check_packing=False)

    trainer = dropping(PackedCollator())
    with pytest.raises(ValueError, match=REFUSED):
        trainer.train()
    assert trainer.state.global_step == 0
    with pytest.raises(ValueError, match=REFUSED):
        dropping(PaddedCollator()).evaluate()


def test_setups_that_keep_the_mask_or_mean_every_token_pass(tmp_path):
    """PackedTrainer and remove_unused_columns=False keep the mask (the same targets);
    completion_only_loss=False trains on every token on purpose."""
    dataset = prompt_completion_dataset()
    packed = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=dataset, check_packing=False)
    kept = plain_trainer(tmp_path, PackedCollator(passthrough_keys=["idx"]), remove_unused_columns=False)
    every_token = plain_trainer(tmp_path, collator=PackedCollator(completion_only_loss=False))
    for trainer in (packed, kept, every_token):
        trainer.train()  # the collator's check runs under the trainer, and passes
    completion = sum(sum(mask[1:]) for mask in dataset["completion_mask"])  # the first token is never a target
    assert targets(packed) == targets(kept) == completion
    assert targets(every_token) == sum(len(ids) - 1 for ids in dataset["input_ids"]) > completion


def test_outside_a_trainer_nothing_is_checked():
    batch = PackedCollator()([{"input_ids": [1, 2, 3]}])
    assert int((batch["labels"] != -100).sum()) == 2


def test_plain_trainer_drops_the_completion_mask_and_the_check_says_so(tmp_path):
    """The pitfall PackedTrainer fixes: the plain Trainer removes completion_mask before collation and would
    train on the prompt; `check_trainer_keeps_masks(trainer)` (run by PackedTrainer before its first step,
    tests/integrations/test_preflight.py) names it."""
    dataset = prompt_completion_dataset()
    plain = Trainer(model=tiny_model(), args=arguments(tmp_path), data_collator=PackedCollator(), train_dataset=dataset)
    packed = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=dataset, check_packing=False)
    targets = [sum(int((b["labels"] != -100).sum()) for b in t.get_train_dataloader()) for t in (plain, packed)]
    assert targets[0] > targets[1] == sum(sum(mask[1:]) for mask in dataset["completion_mask"])
    with pytest.raises(ValueError, match="expected the 'completion_mask' column of the training dataset to reach the collator"):
        check_trainer_keeps_masks(plain)
    check_trainer_keeps_masks(packed)


# ---------------------------------------------------------------------------------------------
# Lengths
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------


def test_fsdp_asked_on_cpu_is_refused_not_run_as_ddp(tmp_path, free_port):
    """TrainingArguments(fsdp="full_shard") on 2 CPU ranks: accelerate would train with DDP; refused first."""
    result = launch("fsdp_asked_on_cpu.py", str(tmp_path), port=free_port)
    assert result.stdout.count("FSDP was asked for (TrainingArguments(fsdp=") == 2, result.stdout  # both ranks
    assert "but accelerate runs DistributedType.MULTI_CPU and would not shard the model" in result.stdout


def test_accelerate_launch_check_names_the_command():
    from accelerate import Accelerator

    from packcollate.integrations.preflight import assert_processes

    accelerator = Accelerator(cpu=True)
    assert_processes(accelerator, 1)
    with pytest.raises(RuntimeError, match=r"expected 2 processes, got 1: .*accelerate launch --multi_gpu --num_processes 2"):
        assert_processes(accelerator, 2)


@pytest.mark.parametrize("kind", ["plain", "deepspeed", "deepspeed-no-batch-size"])
def test_two_cpu_processes_without_use_cpu_are_refused_at_train_start(kind, tmp_path, free_port):
    """torchrun, 2 processes, no use_cpu=True: unsynchronised runs (plain), DeepSpeed's batch assertion, or every rank
    training the whole dataset (DeepSpeed without train_batch_size). PackedTrainer refuses each with the fix."""
    if kind.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    result = launch("launch_without_use_cpu.py", str(tmp_path), kind, port=free_port)
    assert result.stdout.count("REFUSED: ") == 2, result.stdout[-2000:]  # both ranks
    assert "use_cpu=True" in result.stdout and "(steps: 0)" in result.stdout


class _Accelerator:
    """What `assert_processes` reads of an `accelerate.Accelerator`."""

    def __init__(self, num_processes, distributed_type):
        self.num_processes, self.distributed_type = num_processes, distributed_type


def test_assert_processes_reads_the_launch(monkeypatch):
    from accelerate.utils import DistributedType

    from packcollate.integrations.preflight import assert_processes

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_processes(_Accelerator(2, DistributedType.MULTI_CPU))
    with pytest.raises(RuntimeError, match=r"^2 processes were launched but each trains as 1 of 1 .*use_cpu=True"):
        assert_processes(_Accelerator(1, DistributedType.DEEPSPEED))
    with pytest.raises(RuntimeError, match=r"^2 processes run without a distributed backend .*unsynchronised.*use_cpu=True"):
        assert_processes(_Accelerator(2, DistributedType.NO))
    monkeypatch.delenv("WORLD_SIZE")
    assert_processes(_Accelerator(1, DistributedType.NO))  # one process, nothing launched


def test_batch_size_one_without_a_budget_is_announced_once(tmp_path, caplog):
    from tests.helpers import warnings_of

    args = arguments(tmp_path, per_device_train_batch_size=1, max_steps=2)
    trainer = PackedTrainer(model=tiny_model(), args=args, train_dataset=prompt_completion_dataset(), check_packing=False)
    with caplog.at_level("WARNING", logger="packcollate"):
        trainer.train()
        trainer.train()
    said = [r.getMessage() for r in warnings_of(caplog) if "per_device_train_batch_size=1" in r.getMessage()]
    assert len(said) == 1 and "nothing is packed" in said[0] and "max_tokens_per_batch" in said[0], said
    caplog.clear()
    budget = PackedTrainer(model=tiny_model(), args=args, train_dataset=prompt_completion_dataset(),
                           check_packing=False, max_tokens_per_batch=200)
    with caplog.at_level("WARNING", logger="packcollate"):
        budget.train()
    assert not [r for r in warnings_of(caplog) if "per_device_train_batch_size=1" in r.getMessage()]
