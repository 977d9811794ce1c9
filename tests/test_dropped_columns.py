"""The plain `Trainer` removes `completion_mask` (`remove_unused_columns=True`, the default) before the
collator sees a row: a completion-only run would train on the prompt. The collator refuses, in the main
process and in DataLoader workers (forked or spawned), for training and evaluation; the setups that keep
the mask, or say every token is trained on, pass (`packcollate.dropped_columns`)."""

import pytest
from transformers import Trainer

import packcollate  # noqa: F401
from packcollate import PackedCollator, PaddedCollator
from packcollate.dropped_columns import removed_masks
from packcollate.integrations import PackedTrainer

from test_trainer_integration import arguments, prompt_completion_dataset, tiny_model

REFUSED = "expected the 'completion_mask' column of the training and evaluation dataset to reach the collator"


def targets(trainer) -> int:
    return sum(int((batch["labels"] != -100).sum()) for batch in trainer.get_train_dataloader())


def plain_trainer(tmp_path, collator=None, **options):
    return Trainer(model=tiny_model(), args=arguments(tmp_path, **options), data_collator=collator or PackedCollator(),
                   train_dataset=prompt_completion_dataset(), eval_dataset=prompt_completion_dataset(n=4, seed=1))


@pytest.mark.parametrize("workers", [0, "fork", "spawn"])
def test_plain_trainer_refuses_in_every_process(tmp_path, workers):
    options = {} if workers == 0 else dict(dataloader_num_workers=1, dataloader_multiprocessing_context=workers)
    trainer = plain_trainer(tmp_path, **options)
    assert removed_masks(trainer) == {"training": ["completion_mask"], "evaluation": ["completion_mask"]}
    with pytest.raises(Exception, match=REFUSED):  # from a worker, the DataLoader re-raises the ValueError
        trainer.train()
    assert trainer.state.global_step == 0


def test_plain_trainer_refuses_evaluation_too(tmp_path):
    with pytest.raises(ValueError, match=REFUSED):
        plain_trainer(tmp_path, collator=PaddedCollator()).evaluate()


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
