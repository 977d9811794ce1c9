"""TRL's vision-language data path, packed: raw chats with images -> TRL's own processing, one example
at a time -> `PackedVisionCollator`.

TRL does not pre-tokenize vision datasets: its `DataCollatorForVisionLanguageModeling` applies the
processor (chat template, image processor) to every batch on the fly, and refuses `packing` and
`padding_free` for them. `PackedSFTTrainer` keeps TRL's processing and packs its output:

    trainer = PackedSFTTrainer(model=vlm, args=SFTConfig(...), train_dataset=chats_with_images,
                               processing_class=processor)

- every example goes through TRL's collator alone (a batch of one: no padding), so labels, chat
  template, `assistant_only_loss` / `completion_only_loss` are TRL's;
- the processed examples are packed by `PackedVisionCollator(model=trainer.model)` (per-example
  multi-section rotary positions, vision inputs in example order); a plain `PackedCollator` given
  as `data_collator` is upgraded to one with the same options;
- with `max_tokens_per_batch`, the budget counts each example's text *and* image tokens (the
  processor's placeholders), measured by processing every example once (`processed_lengths`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from ..collate.text import BaseCollator, PackedCollator
from ..collate.vision import PackedVisionCollator
from ..errors import InputTypeError


@dataclass
class ProcessThenPack:
    """Process raw examples one at a time with `processing` (TRL's vision collator), then `pack` them.

    Attributes:
        processing: a callable mapping `[example]` to a batch of one (`input_ids` `(1, L)`, vision inputs).
        pack: the `PackedVisionCollator` that packs the processed examples.
    """

    processing: object
    pack: PackedVisionCollator

    def process(self, example: Mapping) -> dict:
        """One raw example -> its processed features (the example itself is not modified)."""
        return dict(self.processing([dict(example)]))

    def __call__(self, examples: Sequence[Mapping]) -> dict:
        return self.pack([self.process(example) for example in examples])


def as_vision_collator(collator, model) -> PackedVisionCollator:
    """`collator` if it already packs vision inputs; a `PackedCollator` becomes a `PackedVisionCollator`
    with the same options for `model`."""
    if isinstance(collator, PackedVisionCollator):
        return collator
    if collator is None:
        return PackedVisionCollator(model=model)
    if not isinstance(collator, PackedCollator):
        raise InputTypeError(f"data_collator: expected a PackedCollator or PackedVisionCollator for a vision dataset, got "
                        f"{type(collator).__name__}")
    options = {f.name: getattr(collator, f.name) for f in fields(PackedCollator) if f.init}
    return PackedVisionCollator(model=model, **options)


def trl_processing(trainer):
    """TRL's own vision collator for `trainer`'s processor and options, without padding or truncation
    (one example at a time; the packer applies `max_seq_length`)."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    args = trainer.args
    return DataCollatorForVisionLanguageModeling(
        processor=trainer.processing_class,
        max_length=None,
        completion_only_loss=trainer.completion_only_loss,
        dataset_text_field=args.dataset_text_field,
        assistant_only_loss=args.assistant_only_loss,
        chat_template=getattr(trainer, "chat_template", None),
    )


def processed_lengths(dataset, collator: ProcessThenPack) -> np.ndarray:
    """`(n,)` int64 tokens of each raw example once processed: text plus image placeholder tokens."""
    return np.fromiter((collator.process(example)["input_ids"].shape[-1] for example in dataset), dtype=np.int64)


def pack_trl_vision(trainer) -> None:
    """Swap `trainer`'s collator for `ProcessThenPack` when TRL detected a vision dataset (else no-op)."""
    if not getattr(trainer, "_is_vision_dataset", False) or isinstance(trainer.data_collator, ProcessThenPack):
        return
    given = trainer.data_collator if isinstance(trainer.data_collator, BaseCollator) else None
    trainer.data_collator = ProcessThenPack(trl_processing(trainer), as_vision_collator(given, trainer.model))
