"""Refuse to train on the prompt because a `Trainer` removed the mask columns before collation.

The plain `transformers.Trainer` keeps only the dataset columns its model's `forward` names
(`remove_unused_columns=True`, the default): `completion_mask` and `assistant_masks` are removed
before the collator sees a row, and a completion-only run silently trains on every token. The rows
the collator receives look exactly like plain language-modelling data, so the check looks at the
`Trainer` itself: the first time a collator is called (or pickled for a spawned DataLoader worker),
`check_trainer_keeps_masks` finds the `Trainer` it runs under, if any (in the call stack: the main
process, or a forked worker, which inherits it), and raises when one of its datasets has a mask
column that the trainer's kept columns leave out while the collator would apply it.

`PackedTrainer` (and TRL's `SFTTrainer`) keep the mask columns, so they pass; so do
`remove_unused_columns=False` and `completion_only_loss=False` (every token trained on, on purpose).
Nothing is checked outside a `Trainer`, nor for an `IterableDataset` whose columns are unknown.
"""

from __future__ import annotations

import sys

from .features import MASK_KEYS


def _calling_trainer():
    """The `transformers.Trainer` whose method is in the call stack, or None."""
    trainer_module = sys.modules.get("transformers.trainer")  # no Trainer without it: nothing to import
    trainer_class = getattr(trainer_module, "Trainer", None)
    if trainer_class is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_class):
            return candidate
        frame = frame.f_back
    return None


def _datasets(trainer) -> dict:
    """{split name: dataset} of the trainer's training and evaluation data."""
    found = {"training": trainer.train_dataset}
    eval_dataset = trainer.eval_dataset
    if isinstance(eval_dataset, dict):
        found.update({f"evaluation ({name})": dataset for name, dataset in eval_dataset.items()})
    else:
        found["evaluation"] = eval_dataset
    return {name: dataset for name, dataset in found.items() if dataset is not None}


def removed_masks(trainer) -> dict[str, list[str]]:
    """{split: mask columns that `trainer` removes from it before collation}; empty when none is removed."""
    if not getattr(trainer.args, "remove_unused_columns", False):
        return {}
    trainer._set_signature_columns_if_needed()
    kept = set(trainer._signature_columns or ())
    removed = {}
    for name, dataset in _datasets(trainer).items():
        columns = getattr(dataset, "column_names", None) or ()
        masks = [key for key in MASK_KEYS if key in columns and key not in kept]
        if masks:
            removed[name] = masks
    return removed


def check_trainer_keeps_masks(collator) -> None:
    """Raise ValueError when the `Trainer` calling `collator` removes mask columns the collator would apply."""
    if not collator.completion_only_loss:
        return
    trainer = _calling_trainer()
    if trainer is None:
        return
    removed = removed_masks(trainer)
    if not removed:
        return
    masks = sorted({mask for split_masks in removed.values() for mask in split_masks})
    model = type(trainer.model).__name__
    raise ValueError(
        f"{type(collator).__name__}: expected the {' and '.join(repr(m) for m in masks)} column of the "
        f"{' and '.join(removed)} dataset to reach "
        f"the collator, got rows without it: {type(trainer).__name__}(remove_unused_columns=True) removes it because "
        f"{model}.forward does not take it, so the prompt would be trained on. Fix: use "
        "packcollate.integrations.PackedTrainer (it keeps the mask columns), or TrainingArguments("
        "remove_unused_columns=False), or completion_only_loss=False to train on every token"
    )
