"""The plain `Trainer` removes `completion_mask` (`remove_unused_columns=True`, the default) before the
collator sees a row: a completion-only run would train on the prompt. `check_trainer_keeps_masks(trainer)`
refuses such a trainer before its first step (PackedTrainer runs it at train and evaluation start; it is
given the trainer, never finds one on the call stack); the setups that keep the mask, or say every token
is trained on, pass (`packcollate.integrations.preflight`)."""

import pytest
from transformers import Trainer

import packcollate  # noqa: F401
from packcollate import PackedCollator, PaddedCollator
from packcollate.integrations import PackedTrainer
from packcollate.integrations.preflight import check_trainer_keeps_masks, removed_masks

from test_trainer_integration import arguments, prompt_completion_dataset, tiny_model

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
