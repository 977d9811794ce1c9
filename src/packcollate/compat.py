"""Model compatibility: is a packed batch exactly equivalent to the same examples unpacked?

- `tiny_config` shrinks any causal-LM config to a few-thousand-parameter copy that keeps its
  structure (attention pattern, GQA ratio, sliding windows, softcapping, experts, layer types).
- `compare_packed_unpacked` runs one packed forward and backward and the reference (each sequence
  on its own, or a padded batch, optionally through another attention backend) on the same model,
  and returns the largest differences of logits, loss and every parameter's gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, PretrainedConfig

from .collate import PackedCollator, PaddedCollator
from .masking import IGNORE_INDEX


@dataclass
class Equivalence:
    """Packed versus reference, on one batch.

    Attributes:
        max_logit_diff: max |logit_packed - logit_reference| over every real token.
        loss: the model's own loss on the packed batch (mean over label tokens).
        reference_loss: the same mean over the reference's label tokens.
        max_grad_rel_diff: max over parameters of max|g_packed - g_ref| / max|g_ref|.
        worst_parameter: the parameter where that maximum is reached.
    """

    max_logit_diff: float
    loss: float
    reference_loss: float
    max_grad_rel_diff: float
    worst_parameter: str

    @property
    def loss_diff(self) -> float:
        return abs(self.loss - self.reference_loss)


TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_VOCAB = 256
TINY_WINDOW = 8  # smaller than a test example, so sliding windows are exercised

# name -> tiny value, applied where the config has the attribute (aliases via attribute_map work too)
_TINY_SIZES = {
    "hidden_size": TINY_HIDDEN,
    "intermediate_size": 2 * TINY_HIDDEN,
    "ffn_hidden_size": 2 * TINY_HIDDEN,
    "n_inner": 2 * TINY_HIDDEN,
    "moe_intermediate_size": TINY_HIDDEN // 2,
    "shared_expert_intermediate_size": TINY_HIDDEN,
    "num_attention_heads": TINY_HEADS,
    "vocab_size": TINY_VOCAB,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": TINY_HIDDEN // TINY_HEADS,
}


def _layer_count_keys(config: PretrainedConfig) -> list[str]:
    return [k for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers") if k in config.to_dict()]


def _pick_layers(layer_types: list | None, n_layers: int, minimum: int = 2) -> list[int]:
    """Indices of the layers to keep: the first `minimum`, plus the first layer of every other type."""
    keep = list(range(min(minimum, n_layers)))
    if layer_types:
        for kind in dict.fromkeys(layer_types):
            first = layer_types.index(kind)
            if first not in keep:
                keep.append(first)
    return sorted(keep)


def tiny_config(config: PretrainedConfig | str, **overrides) -> PretrainedConfig:
    """A tiny copy of `config` (or of the default config of a model type) for numeric checks.

    Shrinks width, depth, heads, vocabulary and experts; keeps the structural options: the ratio of
    key/value heads (GQA, MQA), sliding windows (shrunk to `TINY_WINDOW` tokens), logit softcapping,
    MoE routing, and one layer of each `layer_types` kind. `overrides` are set last.
    """
    config = AutoConfig.for_model(config) if isinstance(config, str) else copy.deepcopy(config)
    values = config.to_dict()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    for key, value in _TINY_SIZES.items():
        if hasattr(config, key) and isinstance(getattr(config, key), int) and not isinstance(getattr(config, key), bool):
            setattr(config, key, min(getattr(config, key), value) if key.startswith(("num_experts_per", "moe_topk")) else value)
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0:
        config.num_key_value_heads = 1 if kv_heads == 1 else (TINY_HEADS if kv_heads >= heads else TINY_HEADS // 2)
    if isinstance(getattr(config, "head_dim", None), int):
        config.head_dim = TINY_HIDDEN // TINY_HEADS
    if isinstance(getattr(config, "sliding_window", None), int) and config.sliding_window > 0:
        config.sliding_window = TINY_WINDOW
    for key in _layer_count_keys(config):
        n_layers = values[key]
        layer_types = values.get("layer_types")
        keep = _pick_layers(layer_types if isinstance(layer_types, list) else None, n_layers)
        setattr(config, key, len(keep))
        for name, value in values.items():  # per-layer lists (layer_types, …) follow the kept layers
            if isinstance(value, list) and len(value) == n_layers:
                setattr(config, name, [value[i] for i in keep])
    special_ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 0}
    for key, small in special_ids.items():  # ids must stay inside the tiny vocabulary
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= TINY_VOCAB:
            setattr(config, key, small)
        elif isinstance(value, list):
            setattr(config, key, [v if v < TINY_VOCAB else small for v in value])
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy. logits `(B, L, V)`, labels `(B, L)` (-100 ignored)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _reference_run(model, features, collator, reference: str, use_cache: bool, device):
    """Forward and backward of the reference; returns its real-token logits `(N, V)` and mean loss."""
    if reference == "padded":
        padded = {k: v.to(device) for k, v in PaddedCollator.like(collator)(features, return_tensors="pt").items()}
        ref_out = model(**padded, use_cache=use_cache)
        ref_out.loss.backward()
        return ref_out.logits[padded["attention_mask"].bool()].detach(), float(ref_out.loss.detach())
    prepared = collator.prepare(features)
    ids = torch.from_numpy(prepared.tokens["input_ids"]).to(device)
    labels = torch.from_numpy(prepared.tokens["labels"]).to(device)
    sequences = list(zip(ids.split(prepared.lengths.tolist()), labels.split(prepared.lengths.tolist())))
    # targets of one sequence: its labels but the first (nothing predicts the first token)
    n_targets = max(sum(int((seq_labels[1:] != IGNORE_INDEX).sum()) for _, seq_labels in sequences), 1)
    pieces, total = [], 0.0
    for seq_ids, seq_labels in sequences:
        seq_out = model(input_ids=seq_ids[None], use_cache=use_cache)
        seq_loss = _summed_token_loss(seq_out.logits, seq_labels[None])
        (seq_loss / n_targets).backward()
        total += float(seq_loss.detach())
        pieces.append(seq_out.logits[0].detach())
    return torch.cat(pieces), total / n_targets


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _max_rel_grad_diff(packed: dict, reference: dict) -> tuple[float, str]:
    worst, worst_name = 0.0, ""
    for name, ref in reference.items():
        got = packed[name]
        if ref is None and got is None:
            continue
        if ref is None or got is None:
            return float("inf"), name
        scale = ref.abs().max().clamp_min(1e-30)
        rel = float((got - ref).abs().max() / scale)
        if rel > worst:
            worst, worst_name = rel, name
    return worst, worst_name


@contextmanager
def _attn_implementation(model, name: str | None):
    """Temporarily switch `model` to attention backend `name` (None: leave as is)."""
    previous = model.config._attn_implementation
    if name is None or name == previous:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def compare_packed_unpacked(
    model: torch.nn.Module,
    features: Sequence[Mapping],
    *,
    collator: PackedCollator | None = None,
    reference: str = "unpacked",
    reference_attn_implementation: str | None = None,
    use_cache: bool = False,
) -> Equivalence:
    """Run `features` packed and as the reference through `model`; return the differences.

    Args:
        model: a causal LM returning `.logits` `(B, L, V)` and `.loss`; put in eval mode (no dropout)
            by the caller. Gradients are computed and left zeroed afterwards.
        features: the examples (the collator's input).
        collator: the packing collator (default `PackedCollator()`); the reference uses the same
            label and length options.
        reference: `"unpacked"` (each sequence alone, no padding) or `"padded"` (one right-padded
            batch with an attention mask).
        reference_attn_implementation: run the reference through this attention backend (e.g.
            `"eager"`, transformers' own) instead of the model's; the packed run keeps the model's.
        use_cache: passed to every forward; `True` is the config default outside `Trainer`.
    """
    if reference not in ("unpacked", "padded"):
        raise ValueError(f"reference: expected 'unpacked' or 'padded', got {reference!r}")
    collator = collator or PackedCollator()
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(features, return_tensors="pt").items()}
    n_real = int(collator.prepare(features).lengths.sum())

    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=use_cache)
    out.loss.backward()
    packed_logits = out.logits[0, :n_real].detach()
    packed_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    with _attn_implementation(model, reference_attn_implementation):
        ref_logits, ref_loss = _reference_run(model, features, collator, reference, use_cache, device)
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    grad_diff, worst = _max_rel_grad_diff(packed_grads, ref_grads)
    return Equivalence(
        max_logit_diff=float((packed_logits.float() - ref_logits.float()).abs().max()),
        loss=float(out.loss.detach()),
        reference_loss=ref_loss,
        max_grad_rel_diff=grad_diff,
        worst_parameter=worst,
    )
