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

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from ..batching.stream import TokenBudgetStream


def is_stream(dataset) -> bool:
    """True for a torch `IterableDataset` (a `datasets.IterableDataset` is one) or another dataset
    without `__len__`/`__getitem__`."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return True
    return not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))


def stream_dataloader(trainer, dataset, description: str, max_tokens: int | None, training: bool) -> DataLoader:
    """A prepared `DataLoader` of this rank's packed batches from the stream `dataset`.

    `max_tokens=None` batches `per_device_train_batch_size` (training) or `per_device_eval_batch_size`
    examples. Columns the collator does not read are removed from each example before collation.
    """
    args = trainer.args
    batch_size = args.per_device_train_batch_size if training else args.per_device_eval_batch_size
    stream = TokenBudgetStream(
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
