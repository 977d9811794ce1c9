"""Iterable datasets in a `Trainer`: packed batches from a stream, planned per rank, never sliced.

A `Trainer` hands an `IterableDataset`'s `DataLoader` to accelerate, which by default
(`dispatch_batches`) reads batches on rank 0 and cuts every tensor along dim 0 for the ranks:
a packed batch is one row, so `input_ids` `(1, N)` stays whole and `cu_seq_lens` `(k+1,)` becomes
`(1,)`. `stream_dataloader` instead wraps the stream in a `TokenBudgetStream` (a token budget, or
`per_device_*_batch_size` examples), which gives every rank its own whole batches and the same
number of steps, and prepares the `DataLoader` for one process: accelerate moves batches to the
device and tracks the end of the data, and shards nothing.
"""

from __future__ import annotations

import json
import os

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..batching.stream import TokenBudgetStream
from ..errors import InputError

#: The file of a checkpoint that says where training stood in a stream (`TrainerStream.position`).
STREAM_POSITION_FILE = "packcollate_stream.json"


class TrainerStream(TokenBudgetStream):
    """The `TokenBudgetStream` a `Trainer` trains on, resumable through the Trainer's checkpoints.

    The Trainer counts a stream's steps as one endless epoch: resumed, it numbers its epochs from 0
    again and would skip the checkpoint's steps from the first pass (after the first pass, batches
    would be trained twice and others never). Here the Trainer's epoch `e` is the stream's pass
    `first_epoch + e`, `trained` counts the batches of the current pass trained (`PackingTrainerMixin.
    training_step`), and a resumed stream skips them itself (the Trainer's own skip is turned off).
    """

    first_epoch: int = 0
    trained: int = 0

    def set_epoch(self, epoch: int) -> None:
        target = self.first_epoch + epoch
        if target != self.epoch:
            self.trained = 0
        super().set_epoch(target)

    def position(self) -> dict:
        """This stream's state after the batches trained (`state_dict_of`); a pass trained to its end is
        the next pass at step 0 (a resume then never starts with an empty pass)."""
        steps = self.steps_in_pass(self.epoch)
        if steps is not None and self.trained >= steps:
            return {**self.state_dict_of(0), "epoch": self.epoch + 1}
        return self.state_dict_of(self.trained)

    def resume(self, position: dict) -> None:
        """Continue from `position` (`position()` of the checkpoint): the Trainer's epoch 0 is its pass."""
        self.load_state_dict(position)
        self.first_epoch, self.trained = self.epoch, self._skip


class SaveStreamPosition(TrainerCallback):
    """Writes the training stream's `position()` into every checkpoint (`STREAM_POSITION_FILE`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        stream = getattr(self.trainer, "train_stream", None)
        if stream is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, STREAM_POSITION_FILE), "w") as file:
                json.dump(stream.position(), file)


def read_stream_position(trainer, resume_from_checkpoint) -> dict | None:
    """The stream position saved in the checkpoint `trainer.train` resumes from; None when it trains on no
    stream, resumes nothing, or `ignore_data_skip` asks to start the stream over.

    Raises InputError for a checkpoint of a stream run without the position (saved before it was recorded):
    the Trainer's own skip would resume the wrong pass."""
    if resume_from_checkpoint in (None, False) or trainer.train_dataset is None or not is_stream(trainer.train_dataset):
        return None
    if trainer.args.ignore_data_skip:
        return None
    if resume_from_checkpoint is True:
        resume_from_checkpoint = get_last_checkpoint(trainer.args.output_dir)
        if resume_from_checkpoint is None:
            return None  # the Trainer names the missing checkpoint
    path = os.path.join(str(resume_from_checkpoint), STREAM_POSITION_FILE)
    if not os.path.isfile(path):
        raise InputError(
            f"resume_from_checkpoint: expected {STREAM_POSITION_FILE} in {resume_from_checkpoint} (where training stood "
            f"in the stream), got none; without it the Trainer would resume the stream's first pass (batches trained "
            f"twice or never); pass ignore_data_skip=True to start the stream over"
        )
    with open(path) as file:
        return json.load(file)


def is_stream(dataset) -> bool:
    """True for a torch `IterableDataset` (a `datasets.IterableDataset` is one) or another dataset
    without `__len__`/`__getitem__`."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return True
    return not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))


def stream_dataloader(trainer, dataset, description: str, max_tokens: int | None, training: bool) -> DataLoader:
    """A prepared `DataLoader` of this rank's packed batches from the stream `dataset`.

    For training, a `TrainerStream` (kept as `trainer.train_stream`), resumed from
    `trainer.stream_position` when the Trainer resumes a checkpoint.

    `max_tokens=None` batches `per_device_train_batch_size` (training) or `per_device_eval_batch_size`
    examples. Columns the collator does not read are removed from each example before collation.
    """
    args = trainer.args
    batch_size = args.per_device_train_batch_size if training else args.per_device_eval_batch_size
    stream = (TrainerStream if training else TokenBudgetStream)(
        dataset,
        max_tokens,
        max_examples=None if max_tokens is not None else batch_size,
        shuffle=training,
        seed=args.seed if args.data_seed is None else args.data_seed,
        strategy=trainer.budget_strategy,
        num_replicas=max(1, args.world_size),
        rank=args.process_index if args.world_size > 1 else 0,
        overflow="own_batch",
    )
    if training:
        position = getattr(trainer, "stream_position", None)
        if position is not None:
            stream.resume(position)
        trainer.train_stream = stream
    loader = DataLoader(
        stream,
        batch_size=None,  # every item of the stream is already a batch (a list of examples)
        collate_fn=trainer._get_collator_with_removed_columns(trainer.data_collator, description=description),
        num_workers=min(args.dataloader_num_workers, 1),
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
    )
    accelerator = trainer.accelerator
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=1,  # the stream already gives this rank its own batches
        process_index=0,
        put_on_device=accelerator.device_placement,
        dispatch_batches=False,
        non_blocking=accelerator.non_blocking,
        use_stateful_dataloader=accelerator.use_stateful_dataloader,
    )
