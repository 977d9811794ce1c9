"""Sequence-classification (reward) models on a packed row: one score per example, at its last token.

    batch = PackedPairCollator()(pairs)                      # or PackedCollator()(examples)
    scores, outputs = packed_sequence_logits(model, batch)  # (k, num_labels)

Hugging Face's `…ForSequenceClassification` heads (Llama, Qwen2/3, Gemma 1-3, Mistral, … share
`GenericForSequenceClassification`) apply the `score` head to every token and keep, per row, the
last token that is not `config.pad_token_id`. On a packed row that is one token for the whole row;
`packed_sequence_logits` reads the head's per-token output `(1, N, num_labels)` with a forward hook
and keeps each *example's* last non-pad token instead (`segments.segment_last`), the token the padded
forward keeps for it. Which head and pad token are read at run time from the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputTypeError, MissingKeyError, UnsupportedError
from ..unwrap import unwrap_model
from .segments import segment_last

#: Attribute names of the classification head, in the order they are looked up.
HEAD_NAMES = ("score", "classifier")
#: Batch keys that describe a packed row but are not model inputs of a classification forward.
NON_MODEL_KEYS = ("margin", "labels", "attention_mask", "completion_mask")


def score_head(model: nn.Module) -> nn.Module:
    """The module whose output are the per-token class logits (`model.score` for the generic heads)."""
    base = unwrap_model(model)
    for name in HEAD_NAMES:
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    raise InputTypeError(
        f"model: expected a sequence-classification model with a per-token head named one of {HEAD_NAMES} "
        f"(AutoModelForSequenceClassification of Llama, Qwen, Gemma, Mistral, …), got {type(base).__name__}"
    )


def packed_sequence_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, object]:
    """Class logits of every example of a packed batch `(k, num_labels)`, and the model's outputs.

    `batch`: a packed batch (`input_ids` `(1, N)`, `position_ids`, `cu_seq_lens_q` `(k+1,)`, …); keys in
    `NON_MODEL_KEYS` are not passed to the model. Example `i`'s logits are the head's output at its
    last token that is not `config.pad_token_id` (its last token when the config has none), as the
    padded forward's pooling picks. Differentiable; the model's own pooled `outputs.logits` (one row
    for the whole packed row) is not what you want.
    """
    if "cu_seq_lens_q" not in batch or "input_ids" not in batch:
        raise MissingKeyError(f"batch: expected a packed batch with 'input_ids' and 'cu_seq_lens_q', got {sorted(batch)}")
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        outputs = model(**{key: value for key, value in batch.items() if key not in NON_MODEL_KEYS})
    finally:
        handle.remove()
    if len(captured) != 1:
        name = type(unwrap_model(model)).__name__
        raise UnsupportedError(f"{name}: expected its classification head to run once, it ran {len(captured)} times")
    per_token = captured[0]
    pad_token_id = unwrap_model(model).config.get_text_config().pad_token_id
    input_ids = batch["input_ids"].to(per_token.device)
    mask = None if pad_token_id is None else input_ids != pad_token_id
    return segment_last(per_token, batch["cu_seq_lens_q"].to(per_token.device), mask), outputs
