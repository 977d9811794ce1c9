"""Hugging Face `Trainer` integration: packed batches, token-budget batching, packing guard.

    from packcollate.integrations import PackedTrainer

    trainer = PackedTrainer(model=model, args=args, train_dataset=ds, eval_dataset=eval_ds,
                            max_tokens_per_batch=16384)          # optional: token-budget batches
    trainer.train()

`PackingTrainerMixin` works in front of any `Trainer` subclass (TRL's `SFTTrainer` too, see
`packcollate.integrations.trl`). On top of the plain `Trainer` it:

- prepares the model (`packcollate.prepare`: layers that carry state, or compute attention inside the
  model, keep packed examples apart);
- uses `PackedCollator()` when no `data_collator` is given;
- keeps the columns the collator reads (`completion_mask`, `assistant_masks`, `seq_lengths`, its
  `passthrough_keys`) through `remove_unused_columns`, which would otherwise drop them silently
  because the model's `forward` does not name them (the prompt would then be trained on);
- with `max_tokens_per_batch`, batches training and evaluation (its own budget with
  `eval_max_tokens_per_batch`) by a `TokenBudgetBatchSampler`, one plan per rank, re-planned every
  epoch; examples longer than the budget train in a batch of their own, with a warning;
- with `check_packing=True` (default), runs `assert_packing_safe` on the model at train start;
- refuses, at train start, a multi-process launch that would not train as one synchronised job
  (`preflight.assert_processes`: on CPU without `use_cpu=True`), and says once that
  `per_device_train_batch_size=1` without `max_tokens_per_batch` packs nothing;
- batches an iterable dataset (a stream) with a `TokenBudgetStream`, the token budget or the
  per-device batch size, every rank the same number of steps (`integrations.streams`);
- measures every split before the first step and says once how many examples exceed
  `max_seq_length` or the model's context (an example longer than the model's positions is an
  error there, not mid-run; and that no mask column was removed: `integrations.preflight`);
- reports `eval_loss` as the token mean over the eval set's targets, whatever the batching
  (`integrations.eval_loss`);
- with accelerate's `ParallelismConfig(sp_backend="deepspeed", sp_size=N)`, splits each packed row
  across `N` ranks with DeepSpeed's Ulysses on the packcollate backend (`PackedTrainer`,
  `PackedSFTTrainer`; `PackedDPOTrainer`/`PackedRewardTrainer` are refused), or refuses before the
  first step (`integrations.sequence_parallel.deepspeed_sequence_parallel`).

The loss needs nothing extra: `Trainer` divides the summed token loss of every micro-batch by the
label tokens of the whole optimizer step, gathered over gradient accumulation and over ranks
(`num_items_in_batch`, `average_tokens_across_devices`), so a packed run gets exactly the padded
run's token-mean loss and gradients (tested with 2 ranks in `tests/integrations/test_trainer.py`).
"""

from __future__ import annotations

import logging

from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from ..backend import prepare
from ..batching.lengths import example_lengths
from ..batching.sampler import TokenBudgetBatchSampler
from ..collate.features import MASK_KEYS
from ..collate.text import BaseCollator, PackedCollator
from ..errors import InputError
from .eval_loss import TokenMeanEvalLoss
from .preflight import (
    assert_fsdp_active,
    assert_processes,
    check_trainer_keeps_masks,
    check_trainer_splits,
)
from .loss_weighting import LossWeightingMixin
from .sequence_parallel import deepspeed_sequence_parallel
from .streams import (
    SaveStreamPosition,
    is_stream,
    read_stream_position,
    stream_dataloader,
)

logger = logging.getLogger("packcollate")

#: Columns a packcollate collator reads besides the model's own inputs.
COLLATOR_COLUMNS = ("input_ids", "labels", "seq_lengths", *MASK_KEYS)


def collator_columns(collator) -> list[str]:
    """Dataset columns `collator` reads: `COLLATOR_COLUMNS` plus its `passthrough_keys`."""
    if not isinstance(collator, BaseCollator):
        return []
    return [*COLLATOR_COLUMNS, *collator.passthrough_keys]


class _SetEpoch(TrainerCallback):
    """Re-plan the token-budget batches at every epoch (accelerate does not forward `set_epoch`
    to a wrapped batch sampler in every version)."""

    def __init__(self, sampler: TokenBudgetBatchSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch or 0))


class PackingTrainerMixin(TokenMeanEvalLoss, LossWeightingMixin):
    """Packed batches for a `Trainer` subclass; put it first: `class T(PackingTrainerMixin, Trainer)`.

    Args:
        max_tokens_per_batch: token budget of one training micro-batch on one rank; None (default)
            keeps the Trainer's fixed `per_device_train_batch_size`.
        eval_max_tokens_per_batch: the same for evaluation (in dataset order); None (default): the
            training budget (or `per_device_eval_batch_size` without one); 0 keeps
            `per_device_eval_batch_size`.
        budget_strategy: `"bfd"` (default), `"ffd"` or `"greedy"` (see `TokenBudgetBatchSampler`).
        loss_weighting: `"token"` (default): the Trainer's token-mean loss; `"sequence"`: every example
            weighs the same (mean over the step's examples of each one's mean token loss, exact
            across gradient accumulation and ranks); `"sum"`: open-instruct's `--reduce_loss sum`, the
            summed token loss / (gradient accumulation steps x ranks). See
            `packcollate.integrations.loss_weighting`.
        check_packing: prove at train start that the model's attention backend keeps packed
            examples apart (`packcollate.compat.assert_packing_safe`); default True.
        data_collator: default `PackedCollator()`. The trainer is built with its own default
            collator and this one swapped in afterwards (TRL refuses custom collators in
            padding-free mode, which this collator provides).
        All other arguments go to the Trainer.
    """

    def __init__(
        self,
        *args,
        data_collator=None,
        max_tokens_per_batch: int | None = None,
        eval_max_tokens_per_batch: int | None = None,
        budget_strategy: str = "bfd",
        check_packing: bool = True,
        loss_weighting: str = "token",
        **kwargs,
    ):
        self.loss_weighting = loss_weighting
        self._check_loss_weighting()
        self.max_tokens_per_batch = max_tokens_per_batch
        self.eval_max_tokens_per_batch = (
            max_tokens_per_batch if eval_max_tokens_per_batch is None else eval_max_tokens_per_batch or None
        )
        self.budget_strategy = budget_strategy
        self._preflight_done = False
        self.train_stream = None  # the TrainerStream of a stream's training batches
        self.stream_position = None  # where a resumed checkpoint stood in that stream
        self._unpacked_warned = False
        super().__init__(*args, **kwargs)
        self.add_callback(SaveStreamPosition(self))
        if self.model is not None:
            prepare(self.model)
        assert_fsdp_active(self.args, self.accelerator)
        self.data_collator = data_collator if data_collator is not None else PackedCollator()
        deepspeed_sequence_parallel(self)  # accelerate's ParallelismConfig(sp_backend="deepspeed", sp_size=N)
        if check_packing:
            from .callbacks import PackingGuardCallback

            collator = self.data_collator if isinstance(self.data_collator, PackedCollator) else None
            self.add_callback(PackingGuardCallback(collator=collator))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in collator_columns(self.data_collator):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def call_model_init(self, trial=None):
        """A `model_init` model is built here, at every `train()`: prepared like the one given at init."""
        return prepare(super().call_model_init(trial))

    def example_lengths(self, dataset):
        """Tokens of each example `(n,)`, what the token budget counts (`batching.lengths.example_lengths`)."""
        return example_lengths(dataset)

    def _budget_dataloader(self, dataset, description: str, max_tokens: int, training: bool) -> DataLoader:
        """A DataLoader whose batches are planned by a rank-aware `TokenBudgetBatchSampler`."""
        import datasets

        collator = self.data_collator
        lengths = self.example_lengths(dataset)  # before unused columns go: `length` is one of them
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        else:
            collator = self._get_collator_with_removed_columns(collator, description=description)
        sampler = TokenBudgetBatchSampler(
            lengths,
            max_tokens,
            shuffle=training,
            seed=self.args.seed if self.args.data_seed is None else self.args.data_seed,
            strategy=self.budget_strategy,
            num_replicas=max(1, self.args.world_size),
            rank=self.args.process_index if self.args.world_size > 1 else 0,
            overflow="own_batch",
        )
        if sampler.oversized_examples:
            logger.warning(
                "%s: %d examples are longer than the token budget (%d): each is a batch of its own, over the "
                "budget; give the collator max_seq_length to truncate or split them",
                description, sampler.oversized_examples, max_tokens,
            )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
        )
        loader = self.accelerator.prepare(loader)
        # The sampler already gives each rank its own batches: make accelerate's shard a passthrough.
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        if training:
            self.callback_handler.callbacks = [c for c in self.callback_handler.callbacks if not isinstance(c, _SetEpoch)]
            self.add_callback(_SetEpoch(sampler))
        return loader

    def _preflight(self) -> None:
        """Before the first training or evaluation step, once: the collator gets its mask columns, and
        every split is measured against the length policy and the model's context (`preflight`)."""
        if not self._preflight_done:
            self._preflight_done = True
            check_trainer_keeps_masks(self)
            message = check_trainer_splits(self)
            if message:
                logger.warning("%s", message)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`; on a stream, a checkpoint resumes at the batch it stood at, in whichever pass
        (`integrations.streams.TrainerStream`: the stream skips the trained batches, not the Trainer)."""
        assert_processes(self.accelerator)  # every launched process one rank of one synchronised job
        self._preflight()
        self._warn_unpacked_batches()
        self.stream_position = read_stream_position(self, resume_from_checkpoint)
        if self.stream_position is None:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        ignore_data_skip = self.args.ignore_data_skip
        self.args.ignore_data_skip = True
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.args.ignore_data_skip = ignore_data_skip
            self.stream_position = None

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.train_stream is not None:
            self.train_stream.trained += 1
        return loss

    def _warn_unpacked_batches(self) -> None:
        """One example per micro-batch (`per_device_train_batch_size=1`, open-instruct's default) packs nothing:
        say so once, unless a token budget batches instead, the rows are pre-packed (`seq_lengths`), or the
        trainer's examples are pairs (DPO, reward models)."""
        if self._unpacked_warned or self.max_tokens_per_batch is not None or self.args.per_device_train_batch_size != 1:
            return
        if not self.loss_is_token_mean:  # DPO / reward pairs: one pair is still two sequences in one row
            return
        if "seq_lengths" in (getattr(self.train_dataset, "column_names", None) or ()):
            return
        self._unpacked_warned = True
        logger.warning(
            "per_device_train_batch_size=1 and no max_tokens_per_batch: every micro-batch holds one example, so "
            "nothing is packed (no speed-up); pass max_tokens_per_batch=N (tokens per micro-batch per rank, at least "
            "the longest example) to %s to pack examples up to a token budget", type(self).__name__,
        )

    def evaluate(self, *args, **kwargs):
        self._preflight()
        return super().evaluate(*args, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is not None and is_stream(self.train_dataset):
            return stream_dataloader(self, self.train_dataset, "training", self.max_tokens_per_batch, training=True)
        if self.max_tokens_per_batch is None or self.train_dataset is None:
            return super().get_train_dataloader()
        return self._budget_dataloader(self.train_dataset, "training", self.max_tokens_per_batch, training=True)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        named = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = named if named is not None else self.eval_dataset
        if dataset is not None and is_stream(dataset):
            return stream_dataloader(self, dataset, "evaluation", self.eval_max_tokens_per_batch, training=False)
        if self.eval_max_tokens_per_batch is None:
            return super().get_eval_dataloader(eval_dataset)
        if dataset is None:
            raise InputError("Trainer: evaluation requires an eval_dataset.")
        return self._budget_dataloader(dataset, "evaluation", self.eval_max_tokens_per_batch, training=False)


class PackedTrainer(PackingTrainerMixin, Trainer):
    """`transformers.Trainer` with packed batches (see `PackingTrainerMixin` for the extra arguments)."""
