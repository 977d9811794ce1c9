"""Trainer callbacks that stop a run before its first step when packed batches would mix examples:
`PackingGuardCallback` (causal LMs) and `SequenceScoreGuardCallback` (sequence classifiers scored per
packed example, the reward trainer).

    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=PackedCollator(),
                      callbacks=[PackingGuardCallback()])

The check is `packcollate.compat.assert_packing_safe`: a numeric proof on a tiny random copy of the
model's architecture (CPU, fp32, a second or so), with the model's own `attn_implementation` and
`config.use_cache` (which `Trainer` sets from `TrainingArguments.use_cache`, False by default).
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..collate.text import PackedCollator
from ..compat.guard import assert_packing_safe, assert_sequence_scores_safe
from ..errors import InputError

logger = logging.getLogger("packcollate")


def _packed_collator(train_dataloader) -> PackedCollator | None:
    """The `PackedCollator` behind a training data loader (`Trainer` may wrap it), or None."""
    collate_fn = getattr(train_dataloader, "collate_fn", None)
    collate_fn = getattr(collate_fn, "data_collator", collate_fn)  # Trainer's RemoveColumnsCollator
    return collate_fn if isinstance(collate_fn, PackedCollator) else None


class PackingGuardCallback(TrainerCallback):
    """On `on_train_begin`, prove that packing is exact for the model about to be trained.

    When the model's attention backend would let packed examples see each other (e.g. sdpa with
    `use_cache=True`, or an architecture whose layers lose the packed layout), training stops
    before the first step: the `RuntimeError` of `assert_packing_safe` names the model class, the
    backend, the difference measured and the fix.

    Args:
        collator: the `PackedCollator` in use; default: the one behind the trainer's training data
            loader (its position offset / `seq_idx` / flash-kwargs options shape the proof).
        use_cache: the `use_cache` of the training forward; default `model.config.use_cache`.
    """

    def __init__(self, collator: PackedCollator | None = None, use_cache: bool | None = None):
        self.collator = collator
        self.use_cache = use_cache

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise InputError("PackingGuardCallback: expected the trainer to pass the model to on_train_begin, got None")
        collator = self.collator or _packed_collator(train_dataloader)
        try:
            assert_packing_safe(model, collator=collator, use_cache=self.use_cache)
        except RuntimeError as error:
            control.should_training_stop = True
            logger.error("PackingGuardCallback stopped training: %s", error)
            raise
        return control


class SequenceScoreGuardCallback(TrainerCallback):
    """On `on_train_begin`, prove that packed scoring is exact for the classifier about to be trained
    (`packcollate.compat.guard.assert_sequence_scores_safe`); training stops before the first step
    otherwise. The reward trainer's `check_packing`: the causal-LM guard does not apply to a classifier."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise InputError(
                "SequenceScoreGuardCallback: expected the trainer to pass the model to on_train_begin, got None"
            )
        assert_sequence_scores_safe(model)
        return control
