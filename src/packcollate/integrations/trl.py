"""TRL `SFTTrainer` integration: `PackedSFTTrainer`, TRL's dataset preparation with our collator.

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
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "packcollate.integrations.trl needs TRL: pip install 'packcollate[trl]' (or pip install trl)"
    ) from error

from .trainer import PackingTrainerMixin
from .trl_preference import PackedDPOTrainer, PackedRewardTrainer  # noqa: F401  (re-exported)
from .trl_vision import ProcessThenPack, pack_trl_vision, processed_lengths


class PackedSFTTrainer(PackingTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` with packcollate's collator (default `PackedCollator()`), token-budget
    batches and packing guard (see `PackingTrainerMixin`). `padding_free` in `SFTConfig` may be on or
    off: the collator packs padding-free either way."""

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
        super().__init__(*args, data_collator=data_collator, max_tokens_per_batch=max_tokens_per_batch,
                         eval_max_tokens_per_batch=eval_max_tokens_per_batch, budget_strategy=budget_strategy,
                         check_packing=check_packing, loss_weighting=loss_weighting, **kwargs)
        pack_trl_vision(self)  # vision datasets: TRL's processing, then PackedVisionCollator

    def _example_lengths(self, dataset):
        if isinstance(self.data_collator, ProcessThenPack):  # raw chats: count text + image tokens once processed
            return processed_lengths(dataset, self.data_collator)
        return super()._example_lengths(dataset)
