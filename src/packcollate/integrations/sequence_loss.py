"""`loss_weighting="sequence"` for `PackedTrainer` / `PackedSFTTrainer`: every example weighs the same.

The loss of an optimizer step is the mean over its examples (all micro-batches of gradient
accumulation, all ranks; those with at least one target) of each example's mean token loss —
`packcollate.objectives.losses` defines it exactly. `Trainer` already gathers a count over accumulation and
ranks for its token-mean loss (`num_items_in_batch`, all-gathered when
`average_tokens_across_devices`, the default); here that count is the number of *examples* with
targets instead of tokens, and each micro-batch's loss is `sum_e mean_e / E`, times the number of
processes to undo DDP's gradient averaging, as `Trainer` does for its own loss. With
`average_tokens_across_devices=False` each rank normalises by its own examples (the mean of the
ranks' sequence means).

With TRL's `SFTTrainer` the loss replaces TRL's `compute_loss`, so TRL's token-level training
metrics (entropy, token accuracy) are not logged in this mode.
"""

from __future__ import annotations

from ..errors import InputError
from ..objectives.losses import examples_with_targets, sequence_weighted_loss

LOSS_WEIGHTINGS = ("token", "sequence")


class SequenceWeightedLossMixin:
    """The `"sequence"` branch of `PackingTrainerMixin`'s `loss_weighting`; `"token"` is the Trainer's own."""

    loss_weighting: str = "token"

    def _sequence_weighted(self) -> bool:
        return self.loss_weighting == "sequence"

    def _get_num_items_in_batch(self, batch_samples, device):
        if not self._sequence_weighted() or not batch_samples or "labels" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        for index, batch in enumerate(batch_samples):
            if "cu_seq_lens_q" not in batch:
                raise InputError(
                    f"loss_weighting='sequence': micro-batch {index} has no 'cu_seq_lens_q'; expected packed batches "
                    f"from PackedCollator (with return_flash_kwargs / the default), got keys {sorted(batch)}"
                )
        count = sum(examples_with_targets(b["labels"], b["cu_seq_lens_q"]).sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._sequence_weighted() or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if "cu_seq_lens_q" not in inputs:
            raise InputError(
                f"loss_weighting='sequence': expected a packed batch with 'cu_seq_lens_q', got {sorted(inputs)}"
            )
        labels = inputs["labels"]
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        loss = sequence_weighted_loss(outputs.logits, labels, inputs["cu_seq_lens_q"], num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self.loss_is_scaled_for_ga = num_items_in_batch is not None  # normalised over the accumulated step
        return (loss, outputs) if return_outputs else loss

    def _check_loss_weighting(self) -> None:
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise InputError(f"loss_weighting: expected one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
