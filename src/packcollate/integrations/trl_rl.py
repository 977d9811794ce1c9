"""Padding-free reinforcement learning with TRL: `PackedGRPOTrainer` and `PackedRLOOTrainer`.

    from packcollate.integrations.trl import PackedGRPOTrainer

    trainer = PackedGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=prompts,
                                processing_class=tokenizer, max_tokens_per_batch=8192)   # budget: optional

Same constructor and config as TRL's trainers. Generation, rewards, advantages, every `loss_type`
and every logged metric stay TRL's own code. What changes is where the log-probs come from: TRL's
`_get_per_token_logps_and_entropies` runs the policy (training forward and backward, and the
old-policy pass) and the reference model on the padded `(B, P+C)` prompt + completion batch; here it
runs them on packed rows (`packcollate.objectives.rollouts.PackedRollouts`): each rollout's prompt +
completion, no padding, rollouts whose completion is masked out (`mask_truncated_completions`) not at
all. The per-token log-probs and entropies of TRL's fused LM head come back laid out as TRL's padded
`(B, C)` tensors (a few floats per position, never logits), 0 where nothing is scored, as the padded
forward has them; TRL's loss code then runs unchanged. With LoRA the reference is the policy with its
adapters off (TRL's rule), on the same packed row. The packed forward draws no random numbers (a model
without dropout), so the completions TRL samples are the padded run's.

`max_tokens_per_batch`: the rollouts of one of TRL's micro-batches (`per_device_train_batch_size`
rollouts; set `steps_per_generation=1` and `gradient_accumulation_steps=1` to make it the whole
generation batch) run in token-budget pieces: the reference and old-policy passes piece by piece,
and the training step in two passes: the log-probs and entropies of every piece without gradient,
TRL's loss on all of them at once (so every loss type's normalisation, the entropy quantile and the
metrics are over the whole micro-batch, exactly), then each piece's forward and backward again with
the loss's gradient with respect to its log-probs and entropies (the chain rule, exact). Peak memory
is one piece's activations; the cost is one more forward without gradient per micro-batch.

Bad input stops the step in one line, never a silently skipped rollout: a reward function returning
the wrong count, NaN, inf or a non-number (None stays TRL's "not applicable"); an empty completion; a
rollout longer than `max_tokens_per_batch`.

Not supported (refused in one line): vision-language rollouts, MoE auxiliary losses, and a token
budget under DeepSpeed (one backward per piece).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Sequence

import torch
from accelerate.utils import DistributedType
from trl import GRPOTrainer, RLOOTrainer

from ..backend import prepare
from ..errors import InputError, InputTypeError, UnsupportedError, check_positive_int
from ..objectives.rollouts import PackedRollouts


class PackedRolloutsMixin:
    """Packed log-prob passes for TRL's GRPO-family trainers; put it first:
    `class T(PackedRolloutsMixin, GRPOTrainer)`.

    Args:
        max_tokens_per_batch: token budget (prompt + completion tokens) of one packed forward; None
            (default): TRL's `per_device_train_batch_size` rollouts per forward. A rollout longer than
            the budget raises.
        check_packing: prove at train start that the model's attention backend keeps packed rollouts
            apart (`PackingGuardCallback`, without a cache: the fused forward runs without one).
        All other arguments go to the TRL trainer.
    """

    def __init__(self, *args, max_tokens_per_batch: int | None = None, check_packing: bool = True, **kwargs):
        self.max_tokens_per_batch = (None if max_tokens_per_batch is None
                                     else check_positive_int("max_tokens_per_batch", max_tokens_per_batch))
        self._given_logps = None
        super().__init__(*args, **kwargs)
        prepare(self.model)
        if self.ref_model is not None:
            prepare(self.ref_model)
        refuse_split_sequences(self)
        if self.max_tokens_per_batch is not None and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise UnsupportedError(f"{type(self).__name__}: max_tokens_per_batch runs one backward per token-budget "
                                   "piece, which DeepSpeed's engine does not take; leave it None under DeepSpeed")
        if self.max_tokens_per_batch is not None and active_dropout(self.model):
            raise UnsupportedError(f"{type(self).__name__}: max_tokens_per_batch runs each piece's forward twice (without "
                                   f"and with gradient), which dropout ({active_dropout(self.model)}) would make two "
                                   "different forwards; keep disable_dropout=True (TRL's default) or leave the budget None")
        self.reward_funcs = [checked_reward(func) for func in self.reward_funcs]
        if check_packing:
            from .callbacks import PackingGuardCallback

            self.add_callback(PackingGuardCallback(use_cache=False))

    def _generate(self, prompts):
        generated = super()._generate(prompts)
        completion_ids = generated[1]  # GRPO and RLOO both return (prompt_ids, completion_ids, ...)
        empty = [i for i, ids in enumerate(completion_ids) if len(ids) == 0]
        if empty:
            raise InputError(f"completion {empty[0]} (prompt {prompts[empty[0]]!r:.80}): expected at least one token, got "
                             f"an empty completion ({len(empty)} of {len(completion_ids)}); it would score nothing and "
                             "be trained on silently")
        return generated

    # -- the packed forward --------------------------------------------------------------------

    def _packed_forward(self, model, rollouts: PackedRollouts, compute_entropy: bool):
        """Log-probs and (optionally) entropies `(B, C)` of `rollouts` from one packed forward."""
        with self.accelerator.autocast():
            outputs = model(**rollouts.model_inputs(), labels=rollouts.labels, fused_lm_head=True)
        entropy = rollouts.padded(outputs.entropy) if compute_entropy else None
        return rollouts.padded(outputs.log_probs), entropy

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's per-token log-probs `(B, C)`, entropies `(B, C)` or None, aux loss (None), from packed rows."""
        given = sorted(key for key, value in multimodal.items() if value is not None)
        if given:
            raise UnsupportedError(f"{type(self).__name__}: expected text-only rollouts, got {given}; use TRL's "
                                   "padded trainer for vision-language models")
        if compute_aux_loss:
            raise UnsupportedError(f"{type(self).__name__}: the MoE load-balancing loss (output_router_logits) is not "
                                   "supported on packed rollouts; set output_router_logits=False in the model config")
        if self._given_logps is not None:  # the budget step's first pass computed them (see _compute_loss)
            logps, entropies = self._given_logps
            return logps, entropies if compute_entropy else None, None
        rollouts = PackedRollouts.of(input_ids, attention_mask, logits_to_keep)
        budget = self.max_tokens_per_batch
        pieces = rollouts.chunks(max_tokens=budget, max_rollouts=None if budget is not None else batch_size)
        logps, entropies = None, None
        for piece in pieces:
            piece_logps, piece_entropies = self._packed_forward(model, piece, compute_entropy)
            logps = piece_logps if logps is None else logps + piece_logps
            if compute_entropy:
                entropies = piece_entropies if entropies is None else entropies + piece_entropies
        return logps, entropies, None

    # -- the token-budget training step ----------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if self.max_tokens_per_batch is None or not torch.is_grad_enabled():
            return super()._compute_loss(model, inputs)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        rollouts = PackedRollouts.of(input_ids, attention_mask, inputs["completion_ids"].shape[1])
        pieces = rollouts.chunks(max_tokens=self.max_tokens_per_batch)
        if len(pieces) <= 1:
            return super()._compute_loss(model, inputs)
        with torch.no_grad():  # pass 1: every piece's log-probs and entropies
            outputs = [self._packed_forward(model, piece, True) for piece in pieces]
        logps = torch.stack([o[0] for o in outputs]).sum(0).requires_grad_()
        entropies = torch.stack([o[1] for o in outputs]).sum(0).requires_grad_()
        self._given_logps = (logps, entropies)
        try:  # TRL's loss and metrics over the whole micro-batch
            loss = super()._compute_loss(model, inputs)
        finally:
            self._given_logps = None
        grad_logps, grad_entropies = torch.autograd.grad(loss, [logps, entropies], allow_unused=True,
                                                         materialize_grads=True)
        # pass 2: each piece's backward with the loss's gradient; the Trainer backpropagates the last
        scale = 1.0 if self.loss_is_scaled_for_ga else 1.0 / self.current_gradient_accumulation_steps
        for piece in pieces[:-1]:
            with self.accelerator.no_sync(model):
                surrogate = self._surrogate(model, piece, grad_logps, grad_entropies)
                self.accelerator.backward(surrogate * scale)
        surrogate = self._surrogate(model, pieces[-1], grad_logps, grad_entropies)
        return loss.detach() + (surrogate - surrogate.detach())

    def _surrogate(self, model, piece: PackedRollouts, grad_logps, grad_entropies) -> torch.Tensor:
        """A scalar whose gradient is the loss's through this piece's log-probs and entropies."""
        through_entropy = bool(grad_entropies.any())  # only an entropy bonus differentiates the entropies
        piece_logps, piece_entropies = self._packed_forward(model, piece, through_entropy)
        surrogate = (piece_logps * grad_logps).sum()
        return surrogate + (piece_entropies * grad_entropies).sum() if through_entropy else surrogate


#: The module classes that drop out at random (their rate is `p`).
DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
                   torch.nn.FeatureAlphaDropout)


def active_dropout(model: torch.nn.Module) -> str | None:
    """The name of the first module of `model` that drops out (an `nn.Dropout` with p > 0, or an attention
    layer with `attention_dropout` > 0), or None."""
    for name, module in model.named_modules():
        if isinstance(module, DROPOUT_MODULES) and module.p > 0:
            return name
        rate = getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, float) and rate > 0:
            return name
    return None


def checked_reward(func):
    """`func` (a rule-based reward function) returning its rewards unchanged after checking them: one
    per completion, each a finite number or None (TRL's "not applicable"); a module or an async
    function is returned as it is (TRL checks its count)."""
    if isinstance(func, torch.nn.Module) or inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func)
    def reward(*args, completions, **kwargs):
        rewards = func(*args, completions=completions, **kwargs)
        name = getattr(func, "__name__", type(func).__name__)
        if not isinstance(rewards, Sequence) or isinstance(rewards, str):
            raise InputTypeError(f"reward function {name!r}: expected a list of {len(completions)} rewards (one per "
                                 f"completion), got {type(rewards).__name__}")
        if len(rewards) != len(completions):
            raise InputError(f"reward function {name!r}: expected {len(completions)} rewards (one per completion), got "
                             f"{len(rewards)}")
        for i, value in enumerate(rewards):
            if value is not None and (not isinstance(value, numbers.Real) or not math.isfinite(value)):
                raise InputError(f"reward function {name!r}, completion {i}: expected a finite number or None (not "
                                 f"applicable), got {value!r}")
        return rewards

    return reward


def refuse_split_sequences(trainer) -> None:
    """Packed rollouts run whole on every rank: a sequence- or context-parallel `ParallelismConfig` (whose
    attention would see one shard of rows that were never split) is refused in one line."""
    config = getattr(trainer.accelerator, "parallelism_config", None)
    split = [name for name in ("sp", "cp") if getattr(config, f"{name}_enabled", False)]
    if split:
        raise UnsupportedError(f"{type(trainer).__name__}: expected no sequence or context parallelism (packed rollouts "
                               f"are not split across ranks), got ParallelismConfig with {' and '.join(split)}_size > 1; "
                               "train without it")


class PackedGRPOTrainer(PackedRolloutsMixin, GRPOTrainer):
    """TRL's `GRPOTrainer` with padding-free log-prob passes (see the module docstring): same arguments,
    plus `max_tokens_per_batch` and `check_packing` (`PackedRolloutsMixin`). Completions, loss,
    metrics and parameters equal `GRPOTrainer`'s for every `loss_type` (tested)."""


class PackedRLOOTrainer(PackedRolloutsMixin, RLOOTrainer):
    """TRL's `RLOOTrainer` with padding-free log-prob passes (see the module docstring): same arguments,
    plus `max_tokens_per_batch` and `check_packing` (`PackedRolloutsMixin`)."""


__all__ = ["PackedGRPOTrainer", "PackedRLOOTrainer", "PackedRolloutsMixin"]
