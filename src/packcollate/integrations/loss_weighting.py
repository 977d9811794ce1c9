"""`loss_weighting` of `PackedTrainer` / `PackedSFTTrainer`: how the next-token losses of a step add up.

- `"token"` (default): the Trainer's own loss, the mean over every target token of the optimizer step
  (all micro-batches of gradient accumulation, all ranks): exactly the padded run's token mean.
- `"sequence"`: every example weighs the same. The loss of a step is the mean over its examples (those
  with at least one target) of each example's mean token loss — `packcollate.objectives.losses`
  defines it exactly. `Trainer` already gathers a count over accumulation and ranks for its token-mean
  loss (`num_items_in_batch`, all-gathered when `average_tokens_across_devices`, the default); here that
  count is the number of *examples* with targets instead of tokens, and each micro-batch's loss is
  `sum_e mean_e / E`, times the number of processes to undo DDP's gradient averaging, as `Trainer` does
  for its own loss. With `average_tokens_across_devices=False` each rank normalises by its own examples
  (the mean of the ranks' sequence means).
- `"sum"`: open-instruct's `--reduce_loss sum`. Every micro-batch's loss is its summed token
  cross-entropy divided by the configured `gradient_accumulation_steps`; DDP / DeepSpeed average the
  gradients over the `W` ranks, so the step's loss is the summed token loss of the whole step / (accumulation
  x W): no division by a token count, a step with more targets takes a larger step. The logged training
  loss is that number; `eval_loss` stays the token mean over the eval set's targets.

With TRL's `SFTTrainer`, `"sequence"` and `"sum"` replace TRL's `compute_loss`, so TRL's token-level
training metrics (entropy, token accuracy) are not logged in these modes.
"""

from __future__ import annotations

from ..errors import InputError
from ..objectives.losses import examples_with_targets, sequence_weighted_loss, summed_token_loss

LOSS_WEIGHTINGS = ("token", "sequence", "sum")


class LossWeightingMixin:
    """The `"sequence"` and `"sum"` branches of `PackingTrainerMixin`'s `loss_weighting`; `"token"` is the
    Trainer's own."""

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
        if self.loss_weighting == "sum" and model.training and "labels" in inputs:
            return self._summed_loss(model, inputs, return_outputs)
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

    def _summed_loss(self, model, inputs, return_outputs):
        """`"sum"`: this micro-batch's summed token loss / the configured accumulation steps (module docstring)."""
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        loss = summed_token_loss(outputs.logits, inputs["labels"]) / self.args.gradient_accumulation_steps
        self.loss_is_scaled_for_ga = True  # divided by the accumulation steps here; ranks: DDP / DeepSpeed average
        return (loss, outputs) if return_outputs else loss

    def _check_loss_weighting(self) -> None:
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise InputError(f"loss_weighting: expected one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
