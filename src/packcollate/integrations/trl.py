"""TRL `SFTTrainer` integration: `PackedSFTTrainer`, TRL's dataset preparation with our collator.

Also re-exported here: `PackedDPOTrainer`, `PackedRewardTrainer` (`trl_preference`) and `PackedGRPOTrainer`,
`PackedRLOOTrainer` (`trl_rl`).

    from packcollate.integrations.trl import PackedSFTTrainer

    trainer = PackedSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                               processing_class=tokenizer, data_collator=PackedCollator(max_seq_length=2048))

TRL prepares the data as usual (prompt/completion -> `labels` with the prompt masked, conversations
-> `assistant_masks`, `packing=True` with the BFD strategy -> pre-packed rows with `seq_lengths`);
our collator packs the batches. TRL refuses a custom collator whenever it runs padding-free
(`padding_free=True`, or `packing=True` with BFD): `PackedSFTTrainer` lets TRL build its own
collator and swaps ours in afterwards, so both work. Vision datasets (`images` / `image` columns with
a processor) keep TRL's on-the-fly processing and are packed by `PackedVisionCollator`
(`packcollate.integrations.trl_vision`).

TRL's defaults work as they are:

- `max_length` (default 1024): TRL truncates while preparing the data, except with `padding_free=True`
  and no packing, which TRL refuses with a `max_length`. There `PackedSFTTrainer` maps `max_length`
  to the collator's length policy instead (`max_seq_length`, `overflow="truncate"`: the start of each
  example is kept, as TRL's default `truncation_mode="keep_start"`), unless the collator already has
  a `max_seq_length`.
- labels: TRL's rule holds. Its prepared data always has `labels` (built from `completion_mask` /
  `assistant_masks`, or the dataset's own `labels`, kept as they are); TRL's collator never applies
  mask columns on top of them, so `PackedSFTTrainer` drops the mask columns of every dataset that
  has `labels`.
- `bf16=True` (the `SFTConfig` default): on a machine without CUDA, `SFTConfig(...)` itself raises
  transformers' `ValueError` ("Your setup doesn't support bf16/gpu ...") unless `use_cpu=True` (or
  `bf16=False`) is given; with `use_cpu=True` the step runs under CPU bf16 autocast (fp32 weights),
  and packcollate's exact attention path runs in bf16.
"""

from __future__ import annotations

import logging

try:
    from trl import SFTTrainer
    from trl.data_utils import get_dataset_column_names
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "packcollate.integrations.trl needs TRL: pip install 'packcollate[trl]' (or pip install trl)"
    ) from error

from ..collate.features import MASK_KEYS
from ..collate.text import BaseCollator, PackedCollator
from ..errors import InputError
from .trainer import PackingTrainerMixin
from .trl_preference import PackedDPOTrainer, PackedRewardTrainer  # noqa: F401  (re-exported)
from .trl_rl import PackedGRPOTrainer, PackedRLOOTrainer  # noqa: F401  (re-exported)
from .trl_vision import ProcessThenPack, pack_trl_vision, processed_lengths

logger = logging.getLogger("packcollate")


def labels_only(dataset):
    """`dataset` without its mask columns when it has `labels` (TRL's label rule); else unchanged."""
    if dataset is None:
        return None
    columns = get_dataset_column_names(dataset)
    masks = [key for key in MASK_KEYS if key in columns]
    return dataset.remove_columns(masks) if masks and "labels" in columns else dataset


class PackedSFTTrainer(PackingTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` with packcollate's collator (default `PackedCollator()`), token-budget
    batches and packing guard (see `PackingTrainerMixin`). `padding_free` in `SFTConfig` may be on or
    off: the collator packs padding-free either way. TRL's default `SFTConfig` works: see the module
    docstring for `max_length`, labels and `bf16`."""

    def __init__(
        self,
        model=None,
        args=None,
        *positional,
        data_collator=None,
        max_tokens_per_batch: int | None = None,
        eval_max_tokens_per_batch: int | None = None,
        budget_strategy: str = "bfd",
        check_packing: bool = True,
        loss_weighting: str = "token",
        **kwargs,
    ):
        hidden = _max_length_trl_refuses(args)
        if hidden is not None:
            if getattr(args, "truncation_mode", "keep_start") != "keep_start":
                raise InputError(
                    f"SFTConfig: expected truncation_mode='keep_start' with padding_free=True and max_length={hidden} "
                    f"(packcollate's length policy keeps the start of each example), got "
                    f"{args.truncation_mode!r}; set padding_free=False instead: TRL then truncates while preparing the "
                    "data and PackedSFTTrainer still trains padding-free"
                )
            data_collator = data_collator if data_collator is not None else PackedCollator()
            if isinstance(data_collator, BaseCollator) and data_collator.max_seq_length is None:
                data_collator.max_seq_length = hidden
                logger.info("PackedSFTTrainer: SFTConfig.max_length=%d with padding_free=True is the collator's "
                            "max_seq_length (examples truncated, keeping their start)", hidden)
            args.max_length = None  # TRL refuses padding_free=True with a max_length and no packing
        try:
            super().__init__(model, args, *positional, data_collator=data_collator,
                             max_tokens_per_batch=max_tokens_per_batch, eval_max_tokens_per_batch=eval_max_tokens_per_batch,
                             budget_strategy=budget_strategy, check_packing=check_packing,
                             loss_weighting=loss_weighting, **kwargs)
        finally:
            if hidden is not None:
                args.max_length = hidden
        if self._skip_prepare_dataset:  # TRL's _prepare_dataset did not run
            self.train_dataset = labels_only(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {name: labels_only(d) for name, d in self.eval_dataset.items()}
            else:
                self.eval_dataset = labels_only(self.eval_dataset)
        pack_trl_vision(self)  # vision datasets: TRL's processing, then PackedVisionCollator

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return labels_only(super()._prepare_dataset(dataset, *args, **kwargs))

    def example_lengths(self, dataset):
        if isinstance(self.data_collator, ProcessThenPack):  # raw chats: count text + image tokens once processed
            return processed_lengths(dataset, self.data_collator)
        return super().example_lengths(dataset)


def _max_length_trl_refuses(args) -> int | None:
    """`args.max_length` when TRL would refuse it (padding-free without packing), else None."""
    padding_free = getattr(args, "padding_free", False)
    if padding_free and not getattr(args, "packing", False) and getattr(args, "max_length", None) is not None:
        return args.max_length
    return None
