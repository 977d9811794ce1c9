"""The evaluation loss as the token mean over every target of the eval set, whatever the batching.

`Trainer.evaluation_loop` averages each batch's loss weighted by its number of *rows*: padded
batches of 4 rows, packed batches of 1 row, token-budget batches of any number of examples all
weigh differently, so the same eval set gets different `eval_loss` values (measured: 4.865635
with a token budget, 4.864570 padded), and one batch with no target at all (truncation cut its
completions) makes the mean NaN. `TokenMeanEvalLoss` sums instead, over all batches and ranks:

    eval_loss = sum over batches of (batch mean loss * batch targets) / sum of batch targets

where a target is a label other than -100 that the model predicts (`labels[..., 1:]` for a causal
LM, or `shift_labels` when the batch has them). A batch without targets adds nothing.
"""

from __future__ import annotations

import logging

import torch

from ..layout import IGNORE_INDEX

logger = logging.getLogger("packcollate")


def batch_targets(inputs: dict, shifts_labels: bool = True) -> int:
    """Tokens the loss of `inputs` averages over: labels other than -100 (after the causal shift)."""
    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    elif "labels" in inputs:
        labels = inputs["labels"][..., 1:] if shifts_labels else inputs["labels"]
    else:
        return 0
    return int((torch.as_tensor(labels) != IGNORE_INDEX).sum())


class TokenMeanEvalLoss:
    """`Trainer` mixin: `eval_loss` is the token mean over the eval set's targets (module docstring).

    Put it before the `Trainer` class in the bases. Each evaluation batch's loss is computed as the
    mean over its own targets and multiplied back by their count; the sums are reduced over ranks.
    """

    _eval_sums: torch.Tensor | None = None
    #: False for trainers whose loss is not a mean over label tokens (DPO, reward models): their own
    #: evaluation loop stays
    loss_is_token_mean: bool = True

    def _token_mean_eval(self) -> bool:
        """Only for a loss over tokens: `loss_weighting` "token" or "sum" (the sum trains the same per-token objective,
        scaled; a `"sequence"` trainer averages examples instead)."""
        return self.loss_is_token_mean and getattr(self, "loss_weighting", "token") in ("token", "sum")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._eval_sums is None:  # training (or not a token mean): the Trainer's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        targets = batch_targets(inputs, getattr(self, "_loss_shifts_labels", True))
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
        if targets:
            self._eval_sums[0] += loss.detach().double().mean() * targets
            self._eval_sums[1] += targets
        else:
            self._eval_sums[2] += 1
            loss = torch.zeros_like(loss)  # the mean over no targets is NaN; it contributes nothing
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        if not self._token_mean_eval():
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        self._eval_sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)  # loss sum, targets, empty
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            sums = self._eval_sums
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
        finally:
            self._eval_sums = None
        loss_sum, targets, empty = sums.tolist()
        if empty:
            logger.warning(
                "%s: %d batches had no targets (every label -100, e.g. truncation cut their completions); they add "
                "nothing to %s_loss", description, int(empty), metric_key_prefix,
            )
        key = f"{metric_key_prefix}_loss"
        if key in output.metrics:
            if targets:
                output.metrics[key] = loss_sum / targets
            else:
                logger.warning("%s: no example has a target (every label is -100): %s is NaN", description, key)
                output.metrics[key] = float("nan")
        return output
