"""Padding-free preference training with TRL: `PackedDPOTrainer` and `PackedRewardTrainer`.

    from packcollate.integrations.trl import PackedDPOTrainer, PackedRewardTrainer

    trainer = PackedDPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(...), train_dataset=pairs,
                               processing_class=tokenizer, max_tokens_per_batch=8192)   # budget: optional

TRL prepares the data as usual (prompt extraction, chat templates, EOS, tokenization, filtering).
Batches are packed: chosen and rejected of every pair, `2B` sequences in one row without padding
(`packcollate.collate.preference`), and the policy and reference forwards run on that row.

**DPO.** The loss, every loss type, the rewards and the logged metrics are TRL's own code:
`PackedDPOTrainer` hands TRL's `_compute_loss` (and `compute_ref_log_probs`) a *view* of the packed
batch as right-padded int masks (`input_ids`, `attention_mask`, `completion_mask` `(2B, L)`, built
on the device from `cu_seq_lens`), and the model forwards, intercepted below TRL's fused LM head
wrapper, run on the packed row instead and return TRL's per-token outputs (`log_probs`, `entropy`,
`mean_logits`, `is_top1`, … `(1, N-1)`) scattered into that padded layout `(2B, L-1)`, zeros after
each sequence, as the padded forward has them. No pad token reaches the model; only the per-token
outputs (a few floats per position, never logits) are laid out padded. With LoRA the reference is
the policy with its adapters off (TRL's rule), on the same packed row.

**Reward models.** `PackedRewardTrainer` scores each packed sequence at its last non-pad token
(`packcollate.objectives.scores.packed_sequence_logits`) and hands TRL's `compute_loss` those
`(2B, num_labels)` scores, so its loss (margins, `center_rewards_coefficient`) and metrics are
TRL's. Both trainers take `PackingTrainerMixin`'s options (`max_tokens_per_batch`, `check_packing`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from trl import DPOTrainer, RewardTrainer

from ..backend import prepare
from ..collate.preference import (
    PackedPairCollator,
    PackedPreferenceCollator,
    pair_tokens,
)
from ..errors import InputError, InputTypeError, MissingKeyError, UnsupportedError
from ..layout import FLASH_KWARGS, IGNORE_INDEX
from ..objectives.scores import packed_sequence_logits
from ..objectives.segments import from_padded, padding_mask, segment_starts, to_padded
from ..unwrap import unwrap_model
from .callbacks import SequenceScoreGuardCallback
from .trainer import PackingTrainerMixin

#: Per-token fields of TRL's `FusedCausalLMOutput` that are laid out like `log_probs` `(rows, L-1)`.
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
#: The model inputs of a packed preference row: its tokens and their layout.
PACKED_INPUT_KEYS = ("input_ids", "position_ids", *FLASH_KWARGS)


@dataclass
class PackedLayout:
    """A packed batch travelling through TRL's padded code as a model kwarg (`packed_layout=`).

    Attributes:
        packed: the packed row's model inputs (`input_ids` `(1, N)`, `position_ids`, `cu_seq_lens_*`, `max_length_*`).
        cu_seq_lens: `(k+1,)` int64 offsets of the `k = 2B` sequences.
        width: `L`, the longest sequence: the padded view is `(k, L)`.
    """

    packed: dict
    cu_seq_lens: torch.Tensor
    width: int

    @classmethod
    def of(cls, batch: dict) -> PackedLayout:
        missing = [key for key in PACKED_INPUT_KEYS if key not in batch]
        if missing:
            raise MissingKeyError(f"batch: expected a packed preference batch with {missing}, got {sorted(batch)}")
        return cls({key: batch[key] for key in PACKED_INPUT_KEYS}, batch["cu_seq_lens_q"].long(), int(batch["max_length_q"]))

    def padded(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """`(1, N)` -> `(k, L)`."""
        return to_padded(values, self.cu_seq_lens, self.width, fill=fill)

    def padded_inputs(self, batch: dict, pad_token_id: int) -> dict:
        """What TRL's padded collator would have given for this batch, as TRL reads it."""
        view = {
            "input_ids": self.padded(batch["input_ids"], fill=pad_token_id),
            "attention_mask": padding_mask(self.cu_seq_lens, self.width).long(),
            "completion_mask": self.padded(batch["completion_mask"]),
            "packed_layout": self,
        }
        return {**view, **{key: batch[key] for key in ("ref_chosen_logps", "ref_rejected_logps") if key in batch}}

    def forward(self, inner, labels=None, fused_lm_head=False, **kwargs):
        """Run `inner` (TRL's fused forward) on the packed row; per-token outputs in the padded view."""
        if not fused_lm_head:  # logits requested (TRL's deprecated `return_outputs` path): the padded forward
            return inner(labels=labels, **kwargs)
        for key in ("input_ids", "attention_mask", "position_ids"):
            kwargs.pop(key, None)
        packed_labels = from_padded(labels, self.cu_seq_lens)  # (1, N)
        starts = segment_starts(self.cu_seq_lens, packed_labels.shape[1])
        packed_labels = packed_labels.masked_fill(starts.unsqueeze(0), IGNORE_INDEX)  # never predicted across examples
        outputs = inner(**self.packed, labels=packed_labels, fused_lm_head=True, **kwargs)
        for name in PER_TOKEN_FIELDS:
            value = getattr(outputs, name, None)
            if value is not None:  # (1, N-1): position j predicts token j+1 -> row i, column t predicts its token t+1
                shifted = torch.cat([value, value.new_zeros(1, 1)], dim=1)
                outputs[name] = self.padded(shifted)[:, :-1]
        return outputs


def _route_packed_layout(module: torch.nn.Module) -> None:
    """Let `module.forward` take `packed_layout=`: then the forward runs on the packed row (see `PackedLayout`)."""
    inner = module.forward
    if getattr(inner, "_packcollate_routed", False):
        return

    @functools.wraps(inner)
    def forward(*args, packed_layout: PackedLayout | None = None, **kwargs):
        if packed_layout is None:
            return inner(*args, **kwargs)
        if args:
            raise InputTypeError(f"forward with packed_layout: expected keyword inputs (as TRL passes them), got {len(args)} "
                            "positional")
        return packed_layout.forward(inner, **kwargs)

    forward._packcollate_routed = True
    module.forward = forward


def _refuse_sequence_weighting(name: str, kwargs: dict) -> None:
    if kwargs.get("loss_weighting", "token") != "token":
        raise InputError(
            f"{name}: loss_weighting applies to the next-token loss of PackedTrainer / PackedSFTTrainer; preference "
            f"losses are per pair already. Expected 'token' (the default), got {kwargs['loss_weighting']!r}"
        )


class PackedDPOTrainer(PackingTrainerMixin, DPOTrainer):
    """TRL's `DPOTrainer` with packed batches: chosen and rejected of every pair in one row, no padding.

    Same arguments as `DPOTrainer`, plus `PackingTrainerMixin`'s (`max_tokens_per_batch`: a token
    budget per micro-batch, counting both sequences of a pair, after `max_length`; `check_packing`).
    `data_collator` defaults to `PackedPreferenceCollator(args.max_length, args.truncation_mode)`.
    Loss, rewards, metrics and gradients are those of `DPOTrainer` on the padded batch (tested for
    several loss types, LoRA, truncation). Not supported: vision datasets and prompt-learning PEFT
    (virtual tokens), which TRL handles on padded rows only.
    """

    loss_is_token_mean = False  # a loss per pair: TRL's evaluation loop, not the token mean

    def __init__(self, *args, data_collator=None, **kwargs):
        _refuse_sequence_weighting(type(self).__name__, kwargs)
        super().__init__(*args, data_collator=data_collator, **kwargs)
        if self._is_vision_dataset:
            raise UnsupportedError("PackedDPOTrainer: vision preference datasets are not supported; use DPOTrainer")
        if data_collator is None:
            self.data_collator = PackedPreferenceCollator(self.args.max_length, self.args.truncation_mode)
        _route_packed_layout(unwrap_model(self.model))
        if self.ref_model is not None:
            _route_packed_layout(prepare(unwrap_model(self.ref_model)))

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.max_tokens_per_batch is None and self.eval_max_tokens_per_batch is None:
            return dataset
        return dataset.map(lambda example: {"length": pair_tokens(example, args.max_length)})

    def _packed_view(self, inputs: dict) -> dict:
        return PackedLayout.of(inputs).padded_inputs(inputs, self._tokenizer.pad_token_id)

    def _compute_loss(self, model, inputs, return_outputs):
        if "cu_seq_lens_q" in inputs:
            inputs = self._packed_view(inputs)
        return super()._compute_loss(model, inputs, return_outputs)

    def compute_ref_log_probs(self, model, inputs):
        if "cu_seq_lens_q" in inputs:
            inputs = self._packed_view(inputs)
        return super().compute_ref_log_probs(model, inputs)


class _PackedScorer:
    """Stands in for the model in TRL's `RewardTrainer.compute_loss`: `scorer(**inputs).logits` are
    the `(2B, num_labels)` scores of the packed sequences."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        scores, _ = packed_sequence_logits(self.model, inputs)
        return SequenceClassifierOutputWithPast(logits=scores)  # TRL reads the logits only (the cache field's name varies by release)


class PackedRewardTrainer(PackingTrainerMixin, RewardTrainer):
    """TRL's `RewardTrainer` with packed batches: chosen and rejected of every pair in one row, each
    scored at its last non-pad token. Same arguments as `RewardTrainer`, plus `PackingTrainerMixin`'s;
    `data_collator` defaults to `PackedPairCollator()`; `check_packing` (default True) runs
    `SequenceScoreGuardCallback` at train start. Loss and metrics are TRL's, computed from
    the packed scores (equal to the padded ones: tested for Llama, Qwen2, Qwen3, Gemma, Gemma 2).
    """

    loss_is_token_mean = False  # a loss per pair: TRL's evaluation loop, not the token mean

    def __init__(self, *args, data_collator=None, check_packing: bool = True, **kwargs):
        _refuse_sequence_weighting(type(self).__name__, kwargs)
        super().__init__(*args, data_collator=data_collator if data_collator is not None else PackedPairCollator(),
                         check_packing=False, **kwargs)
        if check_packing:
            self.add_callback(SequenceScoreGuardCallback())

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.max_tokens_per_batch is None and self.eval_max_tokens_per_batch is None:
            return dataset
        return dataset.map(lambda example: {"length": len(example["chosen_ids"]) + len(example["rejected_ids"])})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "cu_seq_lens_q" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL counts the batch's tokens from `attention_mask`; the scorer does not pass it to the model.
        inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
        return super().compute_loss(_PackedScorer(model), inputs, return_outputs, num_items_in_batch)
