"""Model compatibility: is a packed batch exactly equivalent to the same examples unpacked?

- `tiny_config` shrinks any causal-LM config to a few-thousand-parameter copy that keeps its
  structure (attention pattern, GQA ratio, sliding windows, softcapping, experts, layer types).
- `compare_packed_unpacked` runs one packed forward and backward and the reference (each sequence
  on its own, or a padded batch, optionally through another attention backend) on the same model,
  and returns the largest differences of logits, loss and every parameter's gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, PretrainedConfig

from . import attention
from .collate import PackedCollator, PaddedCollator
from .lengths import context_length
from .masking import IGNORE_INDEX

logger = logging.getLogger("packcollate")


@dataclass
class Equivalence:
    """Packed versus reference, on one batch.

    Attributes:
        max_logit_diff: max |logit_packed - logit_reference| over every real token.
        loss: the model's own loss on the packed batch (mean over label tokens).
        reference_loss: the same mean over the reference's label tokens.
        max_grad_rel_diff: max over parameters of max|g_packed - g_ref| / max|g_ref| (the scale is at
            least `GRAD_SCALE_FLOOR` times the largest gradient of any parameter).
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
TINY_HEAD_DIM = TINY_HIDDEN // TINY_HEADS
TINY_VOCAB = 256
TINY_WINDOW = 8  # smaller than a test example, so sliding windows are exercised
TINY_ROPE_DIM = 8  # MLA: the rotary part of a query/key head

# (value, names): sizes set to that value wherever a config (or sub-config) has them as ints. Grouped by role; the
# names are the ones configs store (attribute_map aliases are resolved to these).
_SIZE_GROUPS = (
    (TINY_HIDDEN, (
        "hidden_size", "d_model", "n_embd", "dim", "embedding_size", "embedding_dim", "emb_dim", "word_embed_proj_dim",
        "input_embedding_size", "output_embedding_size", "hidden_size_global", "lru_width", "backbone_hidden_size",
        "adapter_in_dim", "adapter_input_size",
    )),
    (2 * TINY_HIDDEN, (
        "intermediate_size", "ffn_hidden_size", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "d_ff", "dff",
        "dim_ff", "d_inner", "feed_forward_size", "intermediate_size_mlp", "dense_intermediate_size", "mlp_dim",
    )),
    (TINY_HIDDEN // 2, (
        "moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size",
        "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size", "shared_intermediate_size",
    )),
    (TINY_HEADS, (
        "num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
        "swa_num_attention_heads", "index_n_heads", "linear_num_heads", "indexer_n_heads",
    )),
    (TINY_HEAD_DIM, (
        "head_dim", "d_head", "d_kv", "dim_head", "kv_channels", "attention_head_size", "swa_head_dim",
        "linear_head_dim", "index_head_dim", "indexer_head_dim", "linear_key_head_dim", "linear_value_head_dim",
        "v_head_dim",
    )),
    (TINY_VOCAB, (
        "vocab_size", "decoder_vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size",
        "encoder_hash_byte_group_vocab", "ngram_vocab_size_base",
    )),
    (4, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")),
    (16, ("kv_lora_rank", "o_lora_rank", "state_size", "mamba_d_state", "ssm_state_size")),
    (32, ("q_lora_rank",)),
    (TINY_ROPE_DIM, ("qk_rope_head_dim", "qk_nope_head_dim", "time_step_rank", "mamba_dt_rank")),
    (1, ("n_group", "topk_group", "n_groups", "mamba_n_groups", "mamba_ngroups", "num_expert_group")),
)
_TINY_SIZES = {key: value for value, keys in _SIZE_GROUPS for key in keys}
_HEAD_KEYS = next(keys for value, keys in _SIZE_GROUPS if "num_attention_heads" in keys)
# at most this many (top-k routing, shared experts): kept when already smaller
_CAPPED_KEYS = {"num_experts_per_tok": 2, "moe_topk": 2, "moe_top_k": 2, "moe_k": 2, "num_experts_per_token": 2,
                 "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1, "zero_expert_num": 2}
# key/value heads keep their ratio to the query heads (MHA, GQA or MQA)
_KV_HEAD_KEYS = {
    "num_key_value_heads": "num_attention_heads", "num_kv_heads": "num_attention_heads",
    "kv_n_heads": "num_attention_heads", "n_head_kv": "n_head", "swa_num_key_value_heads": "swa_num_attention_heads",
}
# sliding windows, local-attention chunks and sparse-attention token budgets shrink to TINY_WINDOW
# tokens, so that they bite on short examples
_WINDOW_KEYS = (
    "sliding_window", "sliding_window_size", "attention_window_size", "window_size", "local_attention",
    "local_attention_window_len", "attention_chunk_size", "index_topk", "indexer_budget",
)
_LAYER_TYPE_KEYS = ("layer_types", "layers_block_type", "block_types", "attn_layers", "attention_layers")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers")
# Mamba-2 style mixers: (heads, head size, inner width, expand); heads * head size == inner width
_SSM_HEAD_KEYS = (
    ("num_heads", "head_dim", None, "expand"),
    ("mamba_n_heads", "mamba_d_head", "mamba_d_ssm", "mamba_expand"),
    ("mamba_num_heads", "mamba_head_dim", None, "expand"),
    ("n_mamba_heads", "mamba_headdim", None, "mamba_expand"),
)
_SPECIAL_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 0}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pick_layers(layer_types: list | None, n_layers: int, shared_tail: int = 0, per_type: int = 2) -> list[int]:
    """Indices of the layers to keep: the first `per_type` layers of every layer type (two, so that
    weights shared between layers of a type stay shared), at least the first two layers.

    `shared_tail` last layers that reuse earlier layers' key/value cache (Gemma 3n) are picked on
    their own, so both kinds of layer survive.
    """
    types = [str(t) for t in layer_types] if layer_types else ["layer"] * n_layers
    keep: list[int] = []
    for start, stop in ((0, n_layers - shared_tail), (n_layers - shared_tail, n_layers)):
        seen: dict[str, int] = {}
        for index in range(start, stop):
            if seen.get(types[index], 0) < per_type:
                seen[types[index]] = seen.get(types[index], 0) + 1
                keep.append(index)
    return sorted(keep)


def _first_int(values: dict, keys) -> int | None:
    return next((values[k] for k in keys if _is_int(values.get(k))), None)


def _shrink_sizes(values: dict) -> None:
    """Set widths, heads, vocabularies, experts and windows of one config's `to_dict()` in place."""
    original = dict(values)
    for key, value in original.items():
        if not _is_int(value):
            continue
        if key in _TINY_SIZES:
            values[key] = _TINY_SIZES[key]
        elif key in _CAPPED_KEYS:
            values[key] = min(value, _CAPPED_KEYS[key])
        elif key in _WINDOW_KEYS and value > TINY_WINDOW:
            values[key] = TINY_WINDOW
    _shrink_kv_heads(values, original)
    _shrink_derived_dims(values, original)
    _shrink_ssm_heads(values, original)


def _shrink_kv_heads(values: dict, original: dict) -> None:
    """Key/value heads keep their relation to the query heads: all (MHA), one (MQA) or fewer (GQA)."""
    heads = _first_int(original, _HEAD_KEYS)
    for key, heads_key in _KV_HEAD_KEYS.items():
        kv_heads, of_heads = original.get(key), original.get(heads_key, heads)
        if _is_int(kv_heads) and kv_heads > 0:
            of_heads = of_heads if _is_int(of_heads) else kv_heads  # DBRX keeps its query heads elsewhere
            values[key] = 1 if kv_heads == 1 else TINY_HEADS if kv_heads >= of_heads else TINY_HEADS // 2


def _shrink_derived_dims(values: dict, original: dict) -> None:
    """Sizes defined by other sizes keep that definition."""
    heads = _first_int(original, _HEAD_KEYS)
    hidden = _first_int(original, ("hidden_size", "d_model", "n_embd"))
    # MLA: the head size of the rotary part and the query/key head size follow their parts
    if _is_int(original.get("head_dim")) and original.get("head_dim") == original.get("qk_rope_head_dim"):
        values["head_dim"] = TINY_ROPE_DIM
    if _is_int(original.get("qk_head_dim")):
        values["qk_head_dim"] = values.get("qk_nope_head_dim", 0) + values.get("qk_rope_head_dim", 0)
    # linear attention (gated delta net): value heads keep their multiple of key heads
    if _is_int(original.get("linear_num_key_heads")) and _is_int(original.get("linear_num_value_heads")):
        ratio = max(original["linear_num_value_heads"] // original["linear_num_key_heads"], 1)
        values["linear_num_key_heads"], values["linear_num_value_heads"] = 2, 2 * ratio
    # partial rotary embeddings (GPT-J, CodeGen) keep their fraction of the head
    full_head = original.get("head_dim") if _is_int(original.get("head_dim")) else hidden // heads if hidden and heads else None
    if _is_int(original.get("rotary_dim")) and full_head:
        values["rotary_dim"] = max(2, 2 * round(original["rotary_dim"] / full_head * TINY_HEAD_DIM / 2))
    # Zamba: attention over [hidden states, embeddings], twice the hidden size
    if _is_int(original.get("attention_hidden_size")) and hidden:
        values["attention_hidden_size"] = original["attention_hidden_size"] * TINY_HIDDEN // hidden
        if _is_int(original.get("attention_head_dim")):
            values["attention_head_dim"] = values["attention_hidden_size"] // TINY_HEADS


def _shrink_ssm_heads(values: dict, original: dict) -> None:
    """Mamba-2 style mixers: heads of `TINY_HEAD_DIM` channels filling the inner width."""
    for heads_key, dim_key, inner_key, expand_key in _SSM_HEAD_KEYS:
        if not (_is_int(original.get(heads_key)) and expand_key in original):
            continue
        inner = int(original[expand_key] * values.get("hidden_size", TINY_HIDDEN))
        if inner_key is not None and _is_int(original.get(inner_key)):
            values[inner_key] = inner
        values[heads_key] = max(inner // TINY_HEAD_DIM, 1)
        if dim_key in original:
            values[dim_key] = TINY_HEAD_DIM


def _shrink_layers(values: dict) -> None:
    """Keep the layers `_pick_layers` picks; per-layer lists and `per_layer_config` follow."""
    layer_types = next((values[k] for k in _LAYER_TYPE_KEYS if isinstance(values.get(k), list)), None)
    for key in _LAYER_COUNT_KEYS:
        n_layers = values.get(key)
        if not _is_int(n_layers) or n_layers <= 2:
            continue
        types = layer_types if layer_types is not None and len(layer_types) == n_layers else None
        shared = values.get("num_kv_shared_layers")
        shared = shared if _is_int(shared) and 0 < shared < n_layers else 0
        keep = _pick_layers(types, n_layers, shared_tail=shared)
        values[key] = len(keep)
        if shared:
            values["num_kv_shared_layers"] = sum(index >= n_layers - shared for index in keep)
        for name, value in list(values.items()):
            if isinstance(value, list) and len(value) == n_layers:
                values[name] = [value[i] for i in keep]
        per_layer = values.get("per_layer_config")
        if isinstance(per_layer, dict) and all(str(k).isdigit() for k in per_layer):
            values["per_layer_config"] = _kept_per_layer(per_layer, keep)


def _kept_per_layer(per_layer: dict, keep: list[int]) -> dict:
    """Heterogeneous configs' `{"05": {overrides}}`, renumbered to the kept layers and shrunk."""
    kept = {}
    for new_index, old_index in enumerate(keep):
        for key, overrides in per_layer.items():
            if int(key) == old_index:
                overrides = dict(overrides)
                _shrink_sizes(overrides)
                kept[str(new_index).zfill(len(str(key)))] = overrides
    return kept


def _shrink_special_ids(values: dict) -> None:
    """bos/eos/pad ids must index the tiny vocabulary."""
    for key, small in _SPECIAL_TOKEN_IDS.items():
        value = values.get(key)
        if _is_int(value) and value >= TINY_VOCAB:
            values[key] = small
        elif isinstance(value, list):
            values[key] = [v if not _is_int(v) or v < TINY_VOCAB else small for v in value]


def _rebuild(config_class: type, values: dict) -> PretrainedConfig:
    """A config of `config_class` from `values`: its fields through `__init__` (so that derived
    sizes are computed again), other attributes only where `__init__` did not set them."""
    init_fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    config = config_class(**{k: v for k, v in values.items() if k in init_fields})
    for key, value in values.items():
        if key not in init_fields and not hasattr(config, key):
            setattr(config, key, value)
    return config


def _tiny(config: PretrainedConfig) -> PretrainedConfig:
    """`config` shrunk, sub-configs (text, vision, attention, ffn, …) first."""
    values = config.to_dict()
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            values[key] = _tiny(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, PretrainedConfig) for v in value):
            values[key] = [_tiny(v) for v in value]
    _shrink_sizes(values)
    _shrink_layers(values)
    _shrink_special_ids(values)
    if config.model_type in _FIXUPS:
        _FIXUPS[config.model_type](values)
    return _rebuild(type(config), values)


_QSA_INDEXER = {"indexer_n_heads": 16, "indexer_kv_heads": 1, "indexer_head_dim": 256, "indexer_budget": 2048,
                "indexer_compress_ratio": 4}
# Default configs of transformers that do not build a working model: the options they lack
_DEFAULT_CONFIG_OPTIONS = {
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "dbrx": {"attn_config": {"clip_qkv": 8.0, "kv_n_heads": 8, "rope_theta": 500000.0}},
    "ministral": {"head_dim": 128},
    "hunyuan_v1_dense": {"head_dim": 128},
    "hunyuan_v1_moe": {"head_dim": 128},
    "nemotron": {"num_key_value_heads": 8},
    "deepseek_v2": {"num_experts_per_tok": 6},
    "dots1": {"n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1},
    "lfm2": {"num_hidden_layers": 16, "full_attn_idxs": [2, 5, 8, 10, 12, 14]},  # LFM2-1.2B; the default is all attention
    "lfm2_moe": {"layer_types": ["conv", "conv", "full_attention", "conv"] * 8},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "qwen4_exp_text": _QSA_INDEXER,
    "qwen4_exp": {"text_config": _QSA_INDEXER},
}


def _default_config(model_type: str) -> PretrainedConfig:
    return AutoConfig.for_model(model_type, **_DEFAULT_CONFIG_OPTIONS.get(model_type, {}))


def _fix_gpt_neo(values: dict) -> None:
    """GPT-Neo derives its layer list from `attention_types`: describe the kept layers there."""
    values["attention_types"] = [[values["attention_layers"], 1]]


def _fix_musicgen_decoder(values: dict) -> None:
    """One codebook: MusicGen's decoder reads `(B * codebooks, L)` rows, a packed row is one."""
    values["num_codebooks"] = 1


def _fix_xmod(values: dict) -> None:
    """X-MOD routes every token through a language adapter: pick the first language."""
    values["default_language"] = values.get("default_language") or (values.get("languages") or [None])[0]


# model type -> a function that adjusts its shrunk values so that they build a causal LM
_FIXUPS = {"gpt_neo": _fix_gpt_neo, "musicgen_decoder": _fix_musicgen_decoder,
           "musicgen_melody_decoder": _fix_musicgen_decoder, "xmod": _fix_xmod}


def tiny_config(config: PretrainedConfig | str, **overrides) -> PretrainedConfig:
    """A tiny copy of `config` (or of the default config of a model type) for numeric checks.

    Shrinks width, depth, heads, vocabulary and experts, in the config and every sub-config, and
    rebuilds it so that derived sizes follow; keeps the structural options: the ratio of key/value
    heads (GQA, MQA), sliding windows (shrunk to `TINY_WINDOW` tokens), logit softcapping, MoE
    routing, MLA's rotary/no-rotary split, Mamba heads, and one layer of each `layer_types` kind.
    `overrides` are set last.
    """
    config = _default_config(config) if isinstance(config, str) else config
    tiny = _tiny(config)
    for key, value in overrides.items():
        setattr(tiny, key, value)
    return tiny


def _summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy. logits `(B, L, V)`, labels `(B, L)` (-100 ignored)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@dataclass
class _Run:
    """One forward and backward: real-token logits `(N, V)`, mean loss, every parameter's gradient."""

    logits: torch.Tensor
    loss: float
    grads: dict[str, torch.Tensor | None]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _on_device(batch: Mapping, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _packed_run(model, batch: Mapping, n_real: int, use_cache: bool) -> _Run:
    """The model's own loss on a packed batch `(1, N)`, backward; gradients are left zeroed."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=use_cache)
    out.loss.backward()
    run = _Run(out.logits[0, :n_real].detach(), float(out.loss.detach()), _grads(model))
    model.zero_grad(set_to_none=True)
    return run


def _reference_run(model, features, collator, reference: str, use_cache: bool, device) -> _Run:
    """Forward and backward of the reference (`"unpacked"` or `"padded"`); gradients are left zeroed."""
    model.zero_grad(set_to_none=True)
    if reference == "padded":
        padded = _on_device(PaddedCollator.like(collator)(features, return_tensors="pt"), device)
        ref_out = model(**padded, use_cache=use_cache)
        ref_out.loss.backward()
        logits, loss = ref_out.logits[padded["attention_mask"].bool()].detach(), float(ref_out.loss.detach())
    else:
        logits, loss = _unpacked_forward_backward(model, features, collator, use_cache, device)
    run = _Run(logits, loss, _grads(model))
    model.zero_grad(set_to_none=True)
    return run


def _unpacked_forward_backward(model, features, collator, use_cache: bool, device) -> tuple[torch.Tensor, float]:
    """Each sequence alone: returns the real-token logits `(N, V)` and the mean loss over all of them."""
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


# A parameter's gradient difference is relative to its own largest gradient, but to no less than this
# fraction of the largest gradient of any parameter: a gradient that is zero up to rounding (a top-1
# router whose weight is normalised to 1) has no scale of its own.
GRAD_SCALE_FLOOR = 1e-3


def _max_rel_grad_diff(packed: dict, reference: dict) -> tuple[float, str]:
    """max over parameters of max|g_packed - g_ref| / max(max|g_ref|, GRAD_SCALE_FLOOR * max over all |g_ref|)."""
    scales = {name: ref.abs().max() for name, ref in reference.items() if ref is not None}
    floor = GRAD_SCALE_FLOOR * max(scales.values(), default=torch.tensor(0.0))
    worst, worst_name = 0.0, ""
    for name, ref in reference.items():
        got = packed[name]
        if ref is None and got is None:
            continue
        if ref is None or got is None:
            return float("inf"), name
        scale = torch.maximum(scales[name], floor).clamp_min(1e-30)
        rel = float((got.float() - ref.float()).abs().max() / scale)
        if not rel <= worst:  # NaN counts as the worst
            worst, worst_name = rel, name
    return worst, worst_name


def _equivalence(packed: _Run, reference: _Run) -> Equivalence:
    grad_diff, worst = _max_rel_grad_diff(packed.grads, reference.grads)
    return Equivalence(
        max_logit_diff=float((packed.logits.float() - reference.logits.float()).abs().max()),
        loss=packed.loss,
        reference_loss=reference.loss,
        max_grad_rel_diff=grad_diff,
        worst_parameter=worst,
    )


class BackendRefused(ValueError):
    """A model kept its attention backend when asked to switch (its attention is written inside the model)."""


@contextmanager
def _attn_implementation(model, name: str | None):
    """Temporarily switch `model` to attention backend `name` (None: leave as is)."""
    previous = model.config._attn_implementation
    if name is None or name == previous:
        yield
        return
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # some models refuse the switch with a mere warning
        kept = model.config._attn_implementation
        model.set_attn_implementation(previous)
        raise BackendRefused(
            f"{type(model).__name__} kept attn_implementation={kept!r} when asked for {name!r}: it does not "
            f"switch attention backends after loading; pass attn_implementation={name!r} when building it"
        )
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
    batch = _on_device(collator(features, return_tensors="pt"), device)
    n_real = int(collator.prepare(features).lengths.sum())
    packed = _packed_run(model, batch, n_real, use_cache)
    with _attn_implementation(model, reference_attn_implementation):
        ref = _reference_run(model, features, collator, reference, use_cache, device)
    return _equivalence(packed, ref)


# ---------------------------------------------------------------------------------------------
# check_model: static findings and a numeric proof on a tiny random copy
# ---------------------------------------------------------------------------------------------

OK, WARNING, ERROR = "ok", "warning", "error"
EXACT, CONTAMINATED, UNSUPPORTED = "exact", "contaminated", "unsupported"

# fp32 on a tiny random copy: kernels that differ only in summation order agree to ~1e-6; examples
# that leak into each other differ by ~1e-2 or more.
LOGIT_TOLERANCE = 1e-4  # max |logit_packed - logit_reference|
GRAD_TOLERANCE = 1e-3  # max over parameters of max|g_packed - g_reference| / max|g_reference|
# backends that only run in half precision are proven in bf16 against themselves, one example at a time
HALF_PRECISION_BACKENDS = ("flash_attention_2", "flash_attention_3")
BF16_TOLERANCE = 3e-2

# the proof's examples: uneven lengths, most longer than the tiny windows and token budgets (8)
PROOF_LENGTHS = (11, 27, 5, 19)
REFERENCE_BACKEND = "eager"


@dataclass
class Finding:
    """One static check.

    Attributes:
        name: what was checked (`position_ids`, `layout_route`, `position_offset`, `rope_sections`,
            `recurrent_layers`, `context_length`, `use_cache`).
        status: `"ok"`, `"warning"` or `"error"`.
        message: what was found.
        fix: what to do about it (empty when nothing).
        note: a few words for tables.
    """

    name: str
    status: str
    message: str
    fix: str = ""
    note: str = ""


@dataclass
class Trial:
    """One packed forward and backward, compared with the reference.

    Attributes:
        use_cache: passed to the packed forward.
        verdict: `"exact"`, `"contaminated"` (runs, differs) or `"unsupported"` (raises).
        max_logit_diff, max_grad_rel_diff, loss_diff: the differences (None when it raised).
        worst_parameter: where the gradient differs most.
        error: the exception, one line, when unsupported.
    """

    use_cache: bool
    verdict: str
    max_logit_diff: float | None = None
    max_grad_rel_diff: float | None = None
    loss_diff: float | None = None
    worst_parameter: str = ""
    error: str = ""


@dataclass
class BackendResult:
    """The proof for one attention backend: a trial with `use_cache=False` and one with `True`."""

    backend: str
    trials: list[Trial]

    def trial(self, use_cache: bool) -> Trial:
        return next(t for t in self.trials if t.use_cache == use_cache)

    @property
    def verdict(self) -> str:
        """`contaminated` when any trial differs, else the verdict of `use_cache=False` (training)."""
        if any(t.verdict == CONTAMINATED for t in self.trials):
            return CONTAMINATED
        return self.trial(False).verdict

    @property
    def note(self) -> str:
        bad = [t for t in self.trials if t.verdict != EXACT]
        if self.verdict == CONTAMINATED and all(t.use_cache for t in bad if t.verdict == CONTAMINATED):
            return "contaminated only with use_cache=True"
        failed = next((t for t in bad if t.verdict == UNSUPPORTED), None)
        if failed is not None:
            when = "" if all(t.verdict == UNSUPPORTED for t in self.trials) else f" (use_cache={failed.use_cache})"
            return f"raises{when}: {failed.error}"
        return ""

    def to_dict(self) -> dict:
        return {"backend": self.backend, "verdict": self.verdict, "note": self.note,
                "trials": [dataclasses.asdict(t) for t in self.trials]}


@dataclass
class CompatReport:
    """What `check_model` found for one architecture.

    Attributes:
        target: what was checked, as the caller named it.
        model_type: the config's `model_type`.
        architecture: the causal-LM class.
        findings: the static checks, in order.
        backends: the numeric proof per attention backend (empty when it could not run).
        collator_options: the `PackedCollator` options this architecture needs (used by the proof).
        error: why there is no numeric proof (the tiny copy could not be built or run), else "".
        device: where the proof ran.
    """

    target: str
    model_type: str
    architecture: str
    findings: list[Finding]
    backends: list[BackendResult]
    collator_options: dict
    error: str = ""
    device: str = "cpu"

    def result(self, backend: str) -> BackendResult | None:
        return next((b for b in self.backends if b.backend == backend), None)

    def verdict(self, backend: str) -> str | None:
        """The backend's verdict, or None when it was not proven."""
        result = self.result(backend)
        return None if result is None else result.verdict

    def ok_for(self, backend: str, use_cache: bool | None = None) -> bool:
        """Packing is proven exact with `backend` (both `use_cache` values, or the one given) and no
        static check found an error."""
        result = self.result(backend)
        if result is None or any(f.status == ERROR for f in self.findings):
            return False
        return result.verdict == EXACT if use_cache is None else result.trial(use_cache).verdict == EXACT

    def to_dict(self) -> dict:
        return {
            "target": self.target, "model_type": self.model_type, "architecture": self.architecture,
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "backends": [b.to_dict() for b in self.backends],
            "collator_options": self.collator_options, "error": self.error, "device": self.device,
            "tolerances": {"logits": LOGIT_TOLERANCE, "grads": GRAD_TOLERANCE},
        }

    def format_table(self) -> str:
        """A readable report: findings with their fixes, then the proof per backend."""
        lines = [f"{self.architecture} (model_type {self.model_type!r}, checked: {self.target})", "", "static checks:"]
        for f in self.findings:
            lines.append(f"  {f.status:<8} {f.name:<17} {f.message}")
            if f.fix:
                lines.append(f"  {'':<8} {'':<17} fix: {f.fix}")
        lines.append("")
        if self.error:
            lines.append(f"numeric proof: none ({self.error})")
            return "\n".join(lines)
        lines.append(
            f"numeric proof on a tiny random copy ({self.device}, fp32): packed vs one example at a time "
            f"through {REFERENCE_BACKEND!r}; exact = max |logit diff| <= {LOGIT_TOLERANCE:g} and max relative "
            f"gradient diff <= {GRAD_TOLERANCE:g}"
        )
        header = f"  {'backend':<18} {'verdict':<13} {'use_cache=False':<32} {'use_cache=True':<32} note"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for result in self.backends:
            cells = [_trial_cell(result.trial(use_cache)) for use_cache in (False, True)]
            lines.append(f"  {result.backend:<18} {result.verdict:<13} {cells[0]:<32} {cells[1]:<32} {result.note}")
        options = ", ".join(f"{k}={v!r}" for k, v in self.collator_options.items())
        lines += ["", f"collator: PackedCollator({options})"]
        return "\n".join(lines)


def _trial_cell(trial: Trial) -> str:
    if trial.verdict == UNSUPPORTED:
        return UNSUPPORTED
    return f"{trial.verdict} ({trial.max_logit_diff:.1e}, {trial.max_grad_rel_diff:.1e})"


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or repr(error)
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the target --------------------------------------------------------------------------------


@dataclass
class _Target:
    """The causal LM to check: its class and its config (a part of a composite config, e.g.
    MusicGen's decoder, when the causal LM is that part)."""

    name: str
    model_type: str  # of the config named, e.g. "musicgen" when the causal LM is its "musicgen_decoder"
    model_class: type
    config: PretrainedConfig


def _load_config(target, trust_remote_code: bool) -> PretrainedConfig:
    """A config from a directory, a model type, or a model id already in the local cache (no network)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(target)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"target: expected a directory with a config.json, got {str(path)!r} without one")
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if str(target) in CONFIG_MAPPING:
        return _default_config(str(target))
    try:
        return AutoConfig.from_pretrained(str(target), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"target: expected a model, a config, a directory with config.json, a model type (e.g. 'llama') or a "
            f"model id whose config is in the local Hugging Face cache (nothing is downloaded); got {str(target)!r}: "
            f"{_one_line(error)}"
        ) from error


def _causal_lm(config: PretrainedConfig, trust_remote_code: bool) -> tuple[type, PretrainedConfig]:
    """The causal-LM class for `config`, and the config it takes (a sub-config for composite configs)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        model_class = get_class_from_dynamic_module(
            auto_map["AutoModelForCausalLM"], config._name_or_path, local_files_only=True
        )
        return model_class, config
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        hint = " (its config names remote code: pass trust_remote_code=True)" if auto_map else ""
        raise ValueError(
            f"model_type {config.model_type!r}: expected an architecture with a causal-LM head "
            f"(AutoModelForCausalLM), got {type(config).__name__}, which has none{hint}"
        )
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # MusicGen: the causal LM is the decoder part of a composite config
    part = next((v for v in vars(config).values() if isinstance(v, model_class.config_class)), None)
    return model_class, config if isinstance(config, model_class.config_class) or part is None else part


def _resolve_target(target, trust_remote_code: bool) -> _Target:
    if isinstance(target, torch.nn.Module):
        if not isinstance(getattr(target, "config", None), PretrainedConfig):
            raise TypeError(f"target: expected a transformers model with a .config, got {type(target).__name__}")
        return _Target(type(target).__name__, target.config.model_type, type(target), target.config)
    if isinstance(target, PretrainedConfig):
        model_class, config = _causal_lm(target, trust_remote_code)
        return _Target(type(target).__name__, target.model_type, model_class, config)
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"target: expected a model, a config, a path or a model type/id, got {type(target).__name__}")
    loaded = _load_config(target, trust_remote_code)
    model_class, config = _causal_lm(loaded, trust_remote_code)
    return _Target(str(target), loaded.model_type, model_class, config)


def _tiny_model(model_class: type, config: PretrainedConfig, device) -> torch.nn.Module:
    """A tiny random copy of `model_class` with `config`'s structure: fp32, eval mode, eager attention.

    MoE routers' auxiliary loss is off: it depends on the whole batch by design (not attention).
    """
    tiny = tiny_config(config)
    if getattr(tiny, "output_router_logits", False):
        tiny.output_router_logits = False
    torch.manual_seed(0)
    try:
        model = model_class._from_config(tiny, attn_implementation=REFERENCE_BACKEND)
    except ValueError:  # a model without eager attention: its default
        model = model_class._from_config(tiny)
    return model.to(device=device, dtype=torch.float32).eval()


def proof_features(seed: int = 0, lengths: Sequence[int] = PROOF_LENGTHS) -> list[dict]:
    """Random examples `[{"input_ids": [...]}]` inside the tiny vocabulary (ids 3 …, above bos/eos/pad)."""
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, TINY_VOCAB, n).tolist()} for n in lengths]


# --- static checks -------------------------------------------------------------------------------


def _forward_parameters(model_class: type) -> tuple[set[str], bool]:
    """Names of `model_class.forward`'s parameters, and whether it takes `**kwargs`."""
    parameters = inspect.signature(model_class.forward).parameters
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return set(parameters), var_keyword


def check_position_ids(model_class: type) -> Finding:
    """The causal LM's forward must take `position_ids`: they restart at every packed example."""
    names, var_keyword = _forward_parameters(model_class)
    forward = f"{model_class.__name__}.forward"
    if "position_ids" in names:
        return Finding("position_ids", OK, f"{forward} takes position_ids")
    if var_keyword:
        return Finding(
            "position_ids", WARNING,
            f"{forward} has no position_ids parameter, only **kwargs: restarting positions may be ignored",
            "trust the numeric proof below; if it is not exact, train this architecture with padding",
            "position_ids only via **kwargs",
        )
    return Finding(
        "position_ids", ERROR,
        f"{forward} takes no position_ids: a packed batch's restarting positions cannot reach the model "
        f"(model(**batch) raises TypeError)",
        "train this architecture with padding (PaddedCollator)", "no position_ids",
    )


def check_context_length(config: PretrainedConfig, max_seq_length: int | None = None) -> Finding:
    """The longest example the model was built for, against the `max_seq_length` planned.

    Padding-free: only each example must fit, never the packed row (`N` tokens of `k` examples).
    """
    limit, key = context_length(config)
    if limit is None:
        message = "the config names no maximum length (relative positions)"
        return Finding("context_length", OK, message if max_seq_length is None else f"{message}; max_seq_length={max_seq_length}")
    fix = f"PackedCollator(max_seq_length={limit}) truncates longer examples (or overflow='split'/'drop')"
    if max_seq_length is None:
        return Finding(
            "context_length", OK,
            f"examples up to {limit} tokens (config.{key}); padding-free, only each example must fit, not the packed row",
            fix,
        )
    if max_seq_length > limit:
        return Finding(
            "context_length", ERROR,
            f"max_seq_length={max_seq_length} exceeds config.{key}={limit}: longer examples meet positions the "
            f"model never saw (or index past its position table)",
            fix, f"max_seq_length > {key}={limit}",
        )
    return Finding(
        "context_length", OK,
        f"max_seq_length={max_seq_length} fits config.{key}={limit}; the packed row may be longer (each example must fit)",
    )


def check_use_cache(config: PretrainedConfig) -> Finding:
    """With a cache, transformers' sdpa/eager/flex_attention do not look for packed examples."""
    if not getattr(config, "use_cache", False):
        return Finding("use_cache", OK, "config.use_cache is False: transformers detects packing from position_ids")
    return Finding(
        "use_cache", WARNING,
        "config.use_cache is True (Trainer sets it False, a plain loop does not): with a cache, transformers' "
        "sdpa/eager/flex_attention ignore the packing and examples attend to each other; the packcollate "
        "backend is immune (it reads cu_seq_lens_q)",
        "model.config.use_cache = False for training, or attn_implementation='packcollate'", "use_cache=True default",
    )


# configs whose positions have several sections (time, height, width): multimodal rotary embeddings
MROPE_MODEL_TYPES = frozenset({
    "qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe", "glm4v", "glm4v_moe",
    "glm_image", "glm_ocr", "ernie4_5_vl_moe", "hunyuan_vl", "cohere_compass", "qwen3_5", "qwen3_5_moe", "qwen4_exp",
})


def _rope_sections(config: PretrainedConfig) -> list | None:
    """`mrope_section` of the config or its text config, if any."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for candidate in (config, text_config):
        for key in ("rope_parameters", "rope_scaling"):
            rope = getattr(candidate, key, None)
            if isinstance(rope, Mapping):
                for params in (rope, *[v for v in rope.values() if isinstance(v, Mapping)]):
                    if params.get("mrope_section") is not None:
                        return list(params["mrope_section"])
    return None


def check_rope_sections(config: PretrainedConfig) -> Finding:
    """3-D (multimodal) rotary embeddings take `(3, B, N)` position ids; PackedCollator writes `(1, N)`."""
    sections = _rope_sections(config)
    if sections is None and config.model_type not in MROPE_MODEL_TYPES:
        return Finding("rope_sections", OK, "one position per token (1-D rotary or absolute positions)")
    found = f"mrope_section={sections}" if sections is not None else f"model_type {config.model_type!r}"
    return Finding(
        "rope_sections", WARNING,
        f"multimodal rotary embeddings ({found}): positions have time/height/width sections; PackedCollator's 1-D "
        f"position_ids are right for text-only examples (all sections equal) and wrong for image/video tokens",
        "for images or video, compute each example's (3, 1, l_i) position_ids with the model's get_rope_index "
        "and concatenate them along the tokens",
        "3-D rope: text-only packing",
    )


# the embedding counts positions from padding_idx + 1 (RoBERTa and its descendants)
PADDING_OFFSET_MODEL_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod",
    "mpnet", "esm", "longformer", "luke", "ibert",
})


def _position_start(config: PretrainedConfig, model: torch.nn.Module | None) -> int:
    """First position id of a sequence: `padding_idx + 1` for RoBERTa-style embeddings, else 0."""
    if model is not None:
        for module in model.modules():
            padding_idx = getattr(module, "padding_idx", None)
            if hasattr(module, "create_position_ids_from_input_ids") and _is_int(padding_idx):
                return padding_idx + 1
        return 0
    pad = getattr(config, "pad_token_id", None)
    return pad + 1 if config.model_type in PADDING_OFFSET_MODEL_TYPES and _is_int(pad) else 0


def check_position_offset(config: PretrainedConfig, model: torch.nn.Module | None = None) -> Finding:
    """RoBERTa-style models number positions from `pad_token_id + 1`: the collator must too.

    `model` (a tiny copy) is searched for such an embedding; without it the model type decides.
    """
    start = _position_start(config, model)
    if start == 0:
        return Finding("position_offset", OK, "positions start at 0")
    pad = getattr(config, "pad_token_id", start - 1)
    start = pad + 1 if _is_int(pad) else start  # the user's pad id, not the tiny copy's
    return Finding(
        "position_offset", WARNING,
        f"positions start at padding_idx + 1 = {start} (RoBERTa-style embeddings, pad_token_id={pad}); position ids "
        f"from 0 would shift every token's position",
        f"PackedCollator(position_ids_start={start})", f"position_ids_start={start}",
    )


# model types with state carried along the sequence (SSM, short convolution, linear attention, RNN)
RECURRENT_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "jamba", "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "zamba",
    "zamba2", "lfm2", "lfm2_moe", "lfm3", "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
    "qwen4_exp", "qwen4_exp_text", "kimi_linear", "olmo_hybrid", "bailing_hybrid", "recurrent_gemma", "rwkv", "xlstm",
    "minimax",
})
_RECURRENT_LAYER_TYPES = ("mamba", "linear", "conv", "recurrent", "rwkv", "ssm", "deltanet", "hybrid")
# class names of layers that carry state along the sequence (Mamba mixers, short convolutions, gated
# delta nets, lightning/linear attention, RG-LRU, RWKV time mixing, xLSTM)
_RECURRENT_CLASS = re.compile(
    r"Mixer$|MambaLayer$|ShortConv|DeltaNet$|DeltaAttention$|LightningAttention$|Rglru$|RecurrentBlock$|"
    r"^Rwkv(SelfAttention|FeedForward)$|^xLSTMLayer$"
)


def _is_token_mixer(module: torch.nn.Module) -> bool:
    """A layer that carries state along the sequence: by its class name, or because it owns a
    depthwise convolution over the tokens (Mamba's conv1d, short convolutions, ZAYA's CCA)."""
    if _RECURRENT_CLASS.search(type(module).__name__):
        return True
    return any(
        isinstance(child, torch.nn.Conv1d) and 1 < child.groups == child.in_channels and child.kernel_size[0] > 1
        for child in module.children()
    )


def _recurrent_layers(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, tuple[bool, bool]]:
    """Recurrent layer classes that run on `input_ids` `(1, L)` -> (their source mentions seq_idx,
    mentions cu_seq_lens). Layers of towers a text-only forward skips (vision, audio) do not count."""
    candidates = [module for module in model.modules() if _is_token_mixer(module)]
    ran: set[int] = set()
    hooks = [module.register_forward_hook(lambda module, *_: ran.add(id(module))) for module in candidates]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    found = {}
    for module in candidates:
        cls = type(module)
        if id(module) not in ran or cls.__name__ in found:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = ""
        found[cls.__name__] = ("seq_idx" in source, "cu_seq_lens" in source or "cu_seqlens" in source)
    return found


def _config_is_recurrent(config: PretrainedConfig) -> bool:
    types = next((getattr(config, k) for k in _LAYER_TYPE_KEYS if isinstance(getattr(config, k, None), list)), [])
    return config.model_type in RECURRENT_MODEL_TYPES or any(
        word in str(t).lower() for t in types for word in _RECURRENT_LAYER_TYPES
    )


def check_recurrent_layers(config: PretrainedConfig, model: torch.nn.Module | None = None) -> Finding:
    """SSM / short-convolution / linear-attention layers carry state from token to token: packed
    examples need a sequence index (`seq_idx`) or `cu_seq_lens` to reset it.

    `model` (a tiny copy) is run once on one example to find such layers and whether they read
    either; without it the config decides.
    """
    layers = {}
    if model is not None:
        sample = torch.tensor([proof_features(lengths=(PROOF_LENGTHS[0],))[0]["input_ids"]])
        try:
            layers = _recurrent_layers(model, sample.to(next(model.parameters()).device))
        except Exception:  # noqa: BLE001 - the tiny copy does not run: judge by the config
            model = None
    if not layers and not (model is None and _config_is_recurrent(config)):
        return Finding("recurrent_layers", OK, "no SSM, short-convolution or linear-attention layers")
    names = ", ".join(sorted(layers)) or f"the {config.model_type!r} layers"
    by_seq_idx = sorted(name for name, (seq_idx, _) in layers.items() if seq_idx)
    by_cu = sorted(name for name, (_, cu) in layers.items() if cu)
    if by_seq_idx:
        return Finding(
            "recurrent_layers", WARNING,
            f"{names} carry state along the sequence; {', '.join(by_seq_idx)} read seq_idx to reset it at every "
            f"packed example (the CUDA kernels honour it; check the proof below for this device)",
            "PackedCollator(return_seq_idx=True)", "needs seq_idx",
        )
    if by_cu:
        return Finding(
            "recurrent_layers", WARNING,
            f"{names} carry state along the sequence; {', '.join(by_cu)} read cu_seq_lens_q to reset it at every "
            f"packed example",
            "keep PackedCollator(return_flash_attn_kwargs=True) (the default)", "state reset by cu_seq_lens",
        )
    if model is None:
        return Finding(
            "recurrent_layers", WARNING,
            f"{names} may carry state along the sequence (model type / layer types); build the model to know "
            f"whether they read seq_idx",
            "PackedCollator(return_seq_idx=True) if they do; trust the numeric proof", "recurrent layers",
        )
    return Finding(
        "recurrent_layers", ERROR,
        f"{names} carry state along the sequence and read neither seq_idx nor cu_seq_lens: the state of one packed "
        f"example flows into the next",
        "train this architecture with padding (PaddedCollator), not packed", "state leaks across examples",
    )


ROUTES = ("kwargs", "mask", "position_ids")
_PROBE_BACKEND = "_packcollate_probe"
_PROBE_CALLS: list[dict[str, bool]] = []


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    """The packcollate backend, recording which carriers of the packed layout reached it."""
    _PROBE_CALLS.append({
        "kwargs": kwargs.get("cu_seq_lens_q") is not None,
        "mask": attention._is_sequence_map(attention_mask),
        "position_ids": isinstance(kwargs.get("position_ids"), torch.Tensor),
    })
    return attention.packcollate_attention(module, query, key, value, attention_mask, **kwargs)


def _layout_routes(model: torch.nn.Module, batch: Mapping, use_cache: bool) -> tuple[int, list[str]]:
    """(attention calls, the routes that reached every one) of one packed forward through the probe."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_PROBE_BACKEND, _probe_attention)
    AttentionMaskInterface.register(_PROBE_BACKEND, attention.packcollate_mask)
    _PROBE_CALLS.clear()
    try:
        with _attn_implementation(model, _PROBE_BACKEND), torch.no_grad():
            model(**batch, use_cache=use_cache)
    except BackendRefused:  # attention written inside the model: no AttentionInterface call
        return 0, []
    calls = list(_PROBE_CALLS)
    return len(calls), [route for route in ROUTES if calls and all(call[route] for call in calls)]


def check_layout_route(model: torch.nn.Module, batch: Mapping) -> Finding:
    """Which carriers of the packed layout reach every attention call, with and without a cache:
    `kwargs` (`cu_seq_lens_q`), `mask` (the mask transformers builds from position_ids, read by the
    packcollate backend) and `position_ids`. Runs `model` (a tiny copy) twice through a probe.
    """
    try:
        seen = {use_cache: _layout_routes(model, batch, use_cache) for use_cache in (False, True)}
    except Exception as error:  # noqa: BLE001 - any model error is a finding, not a crash
        return Finding("layout_route", WARNING, f"the instrumented forward raised: {_one_line(error)}", "", "probe raised")
    calls = max(n for n, _ in seen.values())
    described = "; ".join(
        f"use_cache={use_cache}: {', '.join(routes) or 'none'}" for use_cache, (_, routes) in seen.items()
    )
    if calls == 0:
        return Finding(
            "layout_route", WARNING,
            "no attention call goes through transformers' AttentionInterface (no attention layers, or attention "
            "written inside the model): attn_implementation does not decide whether packed examples stay apart",
            "trust the numeric proof below", "no AttentionInterface calls",
        )
    if all("kwargs" in routes for _, routes in seen.values()):
        return Finding("layout_route", OK, f"cu_seq_lens_q reaches all {calls} attention calls ({described})")
    if all(routes for _, routes in seen.values()):
        return Finding(
            "layout_route", WARNING,
            f"cu_seq_lens_q does not reach every attention call (a layer drops **kwargs); the layout arrives by "
            f"{described} (of {calls} calls)",
            "attn_implementation='packcollate' (reads position_ids and its mask); kernels fed only cu_seq_lens_* "
            "mix examples here", "kwargs dropped",
        )
    return Finding(
        "layout_route", ERROR,
        f"in some attention calls nothing tells packed examples apart ({described}, of {calls} calls)",
        "train this architecture with padding, or patch its layers to pass **kwargs on", "layout lost",
    )


# --- numeric proof -----------------------------------------------------------------------------


def _flex_unavailable(device) -> str | None:
    """Why flex_attention cannot train here (a one-call probe), or None."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:
        return f"this torch has no flex_attention ({error})"
    q = torch.randn(1, 1, 8, 16, device=device, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except Exception as error:  # noqa: BLE001 - the reason is the report
        return f"{_one_line(error)} (probe on {device}; the model was not run)"
    return None


def backend_unavailable(backend: str, device="cpu") -> str | None:
    """Why `backend` cannot run a training step on `device`, or None when it may."""
    device = torch.device(device)
    if backend == "flex_attention":
        return _flex_unavailable(device)
    if backend in HALF_PRECISION_BACKENDS:
        if device.type != "cuda":
            return f"{backend} needs CUDA, got device {device}"
        if importlib.util.find_spec("flash_attn") is None and backend == "flash_attention_2":
            return "flash_attn is not installed"
    return None


def available_backends(device="cpu") -> list[str]:
    """The default backends to prove: eager, sdpa, flex_attention and packcollate, plus
    flash_attention_2 when flash_attn is installed and the device is CUDA."""
    backends = ["eager", "sdpa"]
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        backends.append("flex_attention")
    backends.append(attention.BACKEND_NAME)
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        backends.append("flash_attention_2")
    return backends


def _trial(use_cache: bool, equivalence: Equivalence, tolerance: tuple[float, float]) -> Trial:
    exact = equivalence.max_logit_diff <= tolerance[0] and equivalence.max_grad_rel_diff <= tolerance[1]
    return Trial(
        use_cache, EXACT if exact else CONTAMINATED, equivalence.max_logit_diff, equivalence.max_grad_rel_diff,
        equivalence.loss_diff, equivalence.worst_parameter,
    )


@dataclass
class _Proof:
    """What every backend's trials share: the packed batch and the reference run."""

    features: list[dict]
    collator: PackedCollator
    batch: dict
    n_real: int
    reference: _Run
    device: torch.device


def _prepare_proof(model, features, collator, device) -> _Proof:
    """The packed batch and the reference: each example alone through eager, fp32, no cache."""
    batch = _on_device(collator(features, return_tensors="pt"), device)
    n_real = int(collator.prepare(features).lengths.sum())
    with _attn_implementation(model, REFERENCE_BACKEND):
        reference = _reference_run(model, features, collator, "unpacked", False, device)
    if not bool(torch.isfinite(reference.logits).all()):
        raise FloatingPointError("the reference logits are not finite")
    return _Proof(features, collator, batch, n_real, reference, device)


def _prove_backend(model, proof: _Proof, backend: str) -> BackendResult:
    """Packed vs reference through `backend`, with `use_cache` False and True."""
    reason = backend_unavailable(backend, proof.device)
    if reason is not None:
        return BackendResult(backend, [Trial(use_cache, UNSUPPORTED, error=reason) for use_cache in (False, True)])
    trials = []
    try:
        with _backend_model(model, backend) as switched:
            for use_cache in (False, True):
                trials.append(_run_trial(switched, proof, backend, use_cache))
    except Exception as error:  # noqa: BLE001 - no model with this backend: the backend is unsupported
        trials = [Trial(use_cache, UNSUPPORTED, error=_one_line(error)) for use_cache in (False, True)]
    return BackendResult(backend, trials)


@contextmanager
def _backend_model(model, backend: str):
    """`model` switched to `backend`; for models that only take a backend when built (Falcon), a twin
    built with it and loaded with the same weights."""
    try:
        switch = _attn_implementation(model, backend)
        switch.__enter__()
    except BackendRefused as refused:
        try:
            twin = type(model)._from_config(copy.deepcopy(model.config), attn_implementation=backend)
        except (ValueError, KeyError, ImportError):  # not buildable with it either: report the refusal
            raise refused from None
        twin.load_state_dict(model.state_dict())
        yield twin.to(device=next(model.parameters()).device, dtype=torch.float32).eval()
        return
    try:
        yield model
    finally:
        switch.__exit__(None, None, None)


def _run_trial(model, proof: _Proof, backend: str, use_cache: bool) -> Trial:
    try:
        if backend in HALF_PRECISION_BACKENDS:
            return _half_precision_trial(model, proof, use_cache)
        packed = _packed_run(model, proof.batch, proof.n_real, use_cache)
    except Exception as error:  # noqa: BLE001 - a backend that raises is unsupported
        return Trial(use_cache, UNSUPPORTED, error=_one_line(error))
    return _trial(use_cache, _equivalence(packed, proof.reference), (LOGIT_TOLERANCE, GRAD_TOLERANCE))


def _half_precision_trial(model, proof: _Proof, use_cache: bool) -> Trial:
    """bf16 kernels: packed vs the same backend one example at a time, both bf16."""
    model.to(torch.bfloat16)
    try:
        packed = _packed_run(model, proof.batch, proof.n_real, use_cache)
        reference = _reference_run(model, proof.features, proof.collator, "unpacked", False, proof.device)
    finally:
        model.to(torch.float32)
    return _trial(use_cache, _equivalence(packed, reference), (BF16_TOLERANCE, BF16_TOLERANCE))


def _proof_collator(model_class: type, position_start: int, recurrent: Finding) -> PackedCollator:
    """The collator the architecture needs: position offset, seq_idx, flash kwargs only if forward takes them."""
    names, var_keyword = _forward_parameters(model_class)
    return PackedCollator(
        position_ids_start=position_start,
        return_seq_idx=recurrent.fix == "PackedCollator(return_seq_idx=True)" and ("seq_idx" in names or var_keyword),
        return_flash_attn_kwargs=var_keyword or "cu_seq_lens_q" in names,
    )


def _collator_options(collator: PackedCollator) -> dict:
    return {
        "position_ids_start": collator.position_ids_start,
        "return_seq_idx": collator.return_seq_idx,
        "return_flash_attn_kwargs": collator.return_flash_attn_kwargs,
    }


def check_model(
    target,
    *,
    backends: Sequence[str] | None = None,
    device="cpu",
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
) -> CompatReport:
    """Is padding-free packing exact for this architecture? Static checks, then a numeric proof.

    Nothing is downloaded and no real weights are used: the proof runs on a tiny random copy built
    from the architecture's config (`tiny_config`), in fp32.

    Args:
        target: a model instance (its class and config are checked), a config, a directory with a
            `config.json`, a model type (`"llama"`: transformers' default config) or a model id whose
            config is already in the local Hugging Face cache.
        backends: attention backends to prove (default `available_backends(device)`).
        device: where the tiny copy runs.
        max_seq_length: the longest example planned, checked against the model's context length.
        trust_remote_code: allow the config's own code (never set unless you pass it).

    Returns:
        A `CompatReport`: `findings` (see `Finding.name`), per-backend verdicts `exact` /
        `contaminated` / `unsupported` with `use_cache` False and True, and the collator options.
    """
    resolved = _resolve_target(target, trust_remote_code)
    backends = list(backends) if backends else available_backends(device)
    with _one_thread():
        return _check_resolved(resolved, backends, device, max_seq_length)


@contextmanager
def _one_thread():
    """Tiny copies run on one CPU thread: faster than several for 64-wide layers, and much faster on a
    loaded machine. The thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_resolved(resolved: _Target, backends: list[str], device, max_seq_length: int | None) -> CompatReport:
    """`check_model` once the target is known: static checks, tiny copy, layout probe, proof."""
    config, model_class = resolved.config, resolved.model_class
    report = CompatReport(
        resolved.name, resolved.model_type, model_class.__name__, [check_position_ids(model_class)], [], {},
        device=str(device),
    )
    try:
        model = _tiny_model(model_class, config, device)
    except Exception as error:  # noqa: BLE001 - no tiny copy: static findings only
        model, report.error = None, f"could not build a tiny copy: {_one_line(error)}"
    recurrent = check_recurrent_layers(config, model)
    report.findings += [
        check_position_offset(config, model), check_rope_sections(config), recurrent,
        check_context_length(config, max_seq_length), check_use_cache(config),
    ]
    collator = _proof_collator(model_class, _position_start(config, model), recurrent)
    report.collator_options = _collator_options(collator)
    if model is None:
        return report
    features = proof_features()
    report.findings.insert(1, check_layout_route(model, _on_device(collator(features, return_tensors="pt"), device)))
    try:
        proof = _prepare_proof(model, features, collator, torch.device(device))
    except Exception as error:  # noqa: BLE001 - the tiny copy does not run at all: no verdict
        report.error = f"the tiny copy does not run one example at a time through {REFERENCE_BACKEND}: {_one_line(error)}"
        return report
    report.backends = [_prove_backend(model, proof, backend) for backend in backends]
    return report


# ---------------------------------------------------------------------------------------------
# Runtime guard for plain training loops
# ---------------------------------------------------------------------------------------------

_GUARD_CACHE: dict[tuple, BackendResult] = {}


def assert_packing_safe(model: torch.nn.Module, *, collator: PackedCollator | None = None, use_cache: bool | None = None) -> None:
    """Raise `RuntimeError` if packed batches would silently mix examples in `model`'s setup.

    Runs the numeric proof once per (class, config, backend, use_cache, collator layout) on a tiny
    random copy (CPU, fp32; the model's own weights are not touched): the model's
    `attn_implementation`, and `use_cache` as given, else `model.config.use_cache`. A backend that
    raises on the tiny copy is not an error here (training would raise loudly anyway): it is logged.

    Args:
        model: the transformers causal LM about to be trained on packed batches.
        collator: the `PackedCollator` in use; its layout options (position offset, seq_idx, flash
            kwargs) are used for the proof.
        use_cache: the `use_cache` the training forward passes (default: the config's).
    """
    config = model.config
    backend = config._attn_implementation or "eager"
    use_cache = bool(getattr(config, "use_cache", False)) if use_cache is None else use_cache
    layout = _collator_options(collator) if collator is not None else None
    key = (type(model), config.to_json_string(use_diff=False), backend, use_cache, str(layout))
    if key not in _GUARD_CACHE:
        with _one_thread():
            _GUARD_CACHE[key] = _guard_proof(model, backend, use_cache, layout)
    result = _GUARD_CACHE[key]
    trial = result.trial(use_cache)
    if trial.verdict == UNSUPPORTED:
        logger.warning("packcollate could not check packing for %s with %r: %s", type(model).__name__, backend, trial.error)
    elif trial.verdict == CONTAMINATED:
        raise RuntimeError(
            f"packed batches are not safe for {type(model).__name__} with attn_implementation={backend!r} and "
            f"use_cache={use_cache}: on a tiny random copy, packed examples differ from the same examples one at a "
            f"time by {trial.max_logit_diff:.3g} (max |logit diff|) and {trial.max_grad_rel_diff:.3g} (max relative "
            f"gradient diff, {trial.worst_parameter}); expected <= {LOGIT_TOLERANCE:g}. Fix: "
            + ("model.config.use_cache = False for training, or " if use_cache else "")
            + "attn_implementation='packcollate' (see `packcollate check`)"
        )


def _guard_proof(model: torch.nn.Module, backend: str, use_cache: bool, layout: dict | None) -> BackendResult:
    """The proof of one backend on a tiny copy of `model`'s class and config."""
    model_class = type(model)
    tiny = _tiny_model(model_class, model.config, "cpu")
    if layout is None:
        layout = _collator_options(_proof_collator(model_class, _position_start(model.config, tiny),
                                                   check_recurrent_layers(model.config, tiny)))
    proof = _prepare_proof(tiny, proof_features(), PackedCollator(**layout), torch.device("cpu"))
    return _prove_backend(tiny, proof, backend)


# ---------------------------------------------------------------------------------------------
# `packcollate check`: one model, or every causal-LM architecture of transformers in isolation
# ---------------------------------------------------------------------------------------------

ALL_COMMAND = "packcollate check --all --jobs 2 --out docs/"


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL_OR_PATH_OR_TYPE",
                        help="a model type (llama), a directory with config.json, or a model id in the local HF cache")
    parser.add_argument("--backend", action="append", dest="backends", metavar="B",
                        help="attention backend to prove (repeatable; default: every available one); the exit "
                             "status follows the first (default packcollate)")
    parser.add_argument("--max-seq-length", type=int, help="the longest example you plan to train on")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the config's own code")
    parser.add_argument("--device", default="cpu", help="where the tiny copy runs (default cpu)")
    parser.add_argument("--all", action="store_true",
                        help="every architecture of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, isolated")
    parser.add_argument("--jobs", type=int, default=2, help="--all: worker processes (default 2)")
    parser.add_argument("--out", default="docs", help="--all: folder for compatibility.md/.json (default docs)")
    parser.add_argument("--timeout", type=float, default=120.0, help="--all: seconds per architecture (default 120)")


def main(args) -> int:
    """0 when the chosen backend is exact (or, with --all, when the matrix was written), else 1."""
    if args.all == (args.model is not None):
        print("packcollate check: expected MODEL_OR_PATH_OR_TYPE or --all, got "
              + ("both" if args.all else "neither"), file=sys.stderr)
        return 2
    if args.all:
        check_all(backends=args.backends, jobs=args.jobs, timeout=args.timeout, out=args.out, device=args.device)
        return 0
    report = check_model(args.model, backends=args.backends, device=args.device,
                         max_seq_length=args.max_seq_length, trust_remote_code=args.trust_remote_code)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    chosen = args.backends[0] if args.backends else attention.BACKEND_NAME
    return 0 if report.ok_for(chosen) else 1


_DRAFT_MODEL = (
    "a draft model for speculative decoding: every layer reads its target model's key/value cache, so it does "
    "not run on text alone"
)
# causal-LM architectures of transformers that have no verdict here, and why
NO_VERDICT_REASONS = {
    "gemma4_assistant": _DRAFT_MODEL,
    "gemma4_unified_assistant": _DRAFT_MODEL,
    "reformer": "Reformer hashes attention buckets with random rotations and its reversible layers only run "
                "backward in train mode: no deterministic step to compare",
    "gemma3n": "its vision tower needs the optional timm package; its text decoder is checked as gemma3n_text",
}


def check_architecture(model_type: str, backends: Sequence[str] | None = None, device="cpu") -> dict:
    """`check_model(model_type).to_dict()` plus `seconds`; an exception becomes the entry's `error`
    (prefixed with the known reason, `NO_VERDICT_REASONS`, when there is one)."""
    start = time.perf_counter()
    try:
        entry = check_model(model_type, backends=backends, device=device).to_dict()
    except Exception as error:  # noqa: BLE001 - one architecture's failure is its entry
        entry = _failed_entry(model_type, f"could not check: {_one_line(error)}", 0.0)
    if entry["error"] and model_type in NO_VERDICT_REASONS:
        entry["error"] = f"{NO_VERDICT_REASONS[model_type]} ({entry['error']})"
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def _worker_loop(conn, check, backends, device, memory_gib: float | None) -> None:
    """A worker process: announce readiness, then check one architecture per message until None."""
    if memory_gib:  # a runaway architecture fails with MemoryError instead of exhausting the machine
        import resource

        limit = int(memory_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("transformers").setLevel(logging.ERROR)
    conn.send("ready")
    while (model_type := conn.recv()) is not None:
        conn.send(check(model_type, backends, device))


class _Worker:
    """One worker process and the architecture it is checking."""

    def __init__(self, context, check, backends, device, memory_gib: float | None):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child, check, backends, device, memory_gib), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task: str | None = None
        self.started = 0.0

    def assign(self, model_type: str) -> None:
        self.task, self.started = model_type, time.monotonic()
        self.conn.send(model_type)

    def death(self) -> str:
        """Why the process ended (after it closed its pipe)."""
        self.process.join(timeout=10)
        code = self.process.exitcode
        if code is None:
            return "stopped answering"
        if code < 0:
            name = signal.Signals(-code).name
            return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        return f"exited with status {code}"

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


def _failed_entry(model_type: str, error: str, seconds: float) -> dict:
    return {"target": model_type, "model_type": model_type, "architecture": "", "findings": [], "backends": [],
            "collator_options": {}, "error": error, "seconds": round(seconds, 2)}


def run_isolated(
    model_types: Sequence[str],
    *,
    backends: Sequence[str] | None = None,
    device="cpu",
    jobs: int = 2,
    timeout: float = 120.0,
    check=check_architecture,
    memory_gib: float | None = 8.0,
    progress: bool = True,
) -> list[dict]:
    """`check(model_type, backends, device) -> dict` for every model type, each in a worker process.

    A model that raises, hangs (more than `timeout` seconds), crashes or runs out of memory costs
    only its own entry (`error` says what happened); a dead or killed worker is replaced. Workers
    are started with `spawn` and limited to `memory_gib` of address space on CPU (None: no limit).
    Returns one entry per model type, in the given order.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")
    limit = memory_gib if torch.device(device).type == "cpu" else None
    pending, results = list(model_types), {}
    workers = [_Worker(context, check, backends, device, limit) for _ in range(min(jobs, len(pending)))]
    failed_starts = 0
    bar = tqdm(total=len(pending), desc="architectures", unit="arch", disable=not progress)
    try:
        while len(results) < len(model_types):
            for worker in workers:
                if worker.ready and worker.task is None and pending:
                    worker.assign(pending.pop(0))
            ready = wait([w.conn for w in workers], timeout=1.0)
            for index, worker in enumerate(workers):
                finished = _poll_worker(worker, worker.conn in ready, timeout)
                if finished is None:
                    continue
                if finished is _DIED and worker.task is None:
                    failed_starts += 1
                    if failed_starts > 3:
                        raise RuntimeError(f"check workers fail to start: the last one {worker.death()}")
                elif finished is not _READY:
                    results[worker.task] = finished
                    worker.task = None
                    bar.update(1)
                    bar.set_postfix_str(finished["model_type"])
                if finished is _DIED or finished.get("error", "").startswith(("timed out", "worker ")):
                    worker.stop()
                    workers[index] = _Worker(context, check, backends, device, limit)
    finally:
        bar.close()
        for worker in workers:
            if worker.process.is_alive() and worker.task is None:
                worker.conn.send(None)
            worker.stop()
    return [results[model_type] for model_type in model_types]


_READY, _DIED = {"ready": True}, {"died": True}


def _poll_worker(worker: _Worker, readable: bool, timeout: float):
    """What happened to `worker`: `_READY`, a finished entry, `_DIED` (no task), or None (nothing)."""
    if readable:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            if worker.task is None:
                return _DIED
            return _failed_entry(worker.task, f"worker {worker.death()}", time.monotonic() - worker.started)
        if message == "ready":
            worker.ready = True
            return _READY
        return message
    if worker.task is not None and time.monotonic() - worker.started > timeout:
        return _failed_entry(worker.task, f"timed out after {timeout:.0f} s", time.monotonic() - worker.started)
    return None


def check_all(
    model_types: Sequence[str] | None = None,
    *,
    backends: Sequence[str] | None = None,
    device="cpu",
    jobs: int = 2,
    timeout: float = 120.0,
    out: str | os.PathLike | None = "docs",
    check=check_architecture,
    progress: bool = True,
    command: str = ALL_COMMAND,
) -> dict:
    """The compatibility matrix: `check_model` on every causal-LM architecture of transformers
    (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, or `model_types`), each isolated (`run_isolated`).

    Writes `compatibility.md` and `compatibility.json` into `out` (None: nothing written) and
    returns the JSON document: command, seconds, versions, summary and one entry per architecture.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_types = list(model_types or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    backends = list(backends) if backends else available_backends(device)
    start = time.perf_counter()
    entries = run_isolated(model_types, backends=backends, device=device, jobs=jobs, timeout=timeout,
                           check=check, progress=progress)
    document = {
        "command": command,
        "seconds": round(time.perf_counter() - start, 1),
        "jobs": jobs,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
        "device": str(device),
        "backends": backends,
        "tolerances": {"logits": LOGIT_TOLERANCE, "grads": GRAD_TOLERANCE},
        "summary": summarize(entries, backends),
        "architectures": entries,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compatibility.json").write_text(json.dumps(document, indent=1) + "\n")
        (out / "compatibility.md").write_text(format_matrix(document))
    return document


def _entry_verdict(entry: dict, backend: str, use_cache: bool) -> str | None:
    for result in entry.get("backends", []):
        if result["backend"] == backend:
            return next(t["verdict"] for t in result["trials"] if t["use_cache"] == use_cache)
    return None


def summarize(entries: Sequence[dict], backends: Sequence[str]) -> dict:
    """Coverage (architectures with a verdict) and verdict counts per backend and `use_cache`."""
    with_verdict = [e for e in entries if e.get("backends")]
    counts = {}
    for backend in backends:
        for use_cache in (False, True):
            tally: dict[str, int] = {}
            for entry in with_verdict:
                verdict = _entry_verdict(entry, backend, use_cache) or "not run"
                tally[verdict] = tally.get(verdict, 0) + 1
            counts[f"{backend} use_cache={use_cache}"] = tally
    return {
        "architectures": len(entries),
        "with_verdict": len(with_verdict),
        "coverage": round(len(with_verdict) / max(len(entries), 1), 4),
        "counts": counts,
    }


_SHORT = {EXACT: "exact", CONTAMINATED: "**contaminated**", UNSUPPORTED: "unsupported", None: "–"}


def format_matrix(document: dict) -> str:
    """`compatibility.md`: how it was made, the summary, and one row per architecture."""
    backends, summary = document["backends"], document["summary"]
    versions = document["versions"]
    lines = [
        "# Model compatibility: is packing exact?",
        "",
        "Generated by `packcollate check --all`; do not edit by hand. For each causal-LM architecture of "
        "transformers (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), a tiny random copy of its default config "
        "(`packcollate.compat.tiny_config`: hidden 64, 4 heads, a few layers, windows of 8 tokens) trains one "
        f"packed batch of {len(PROOF_LENGTHS)} examples (lengths {', '.join(map(str, PROOF_LENGTHS))}) and the same "
        f"examples one at a time through `{REFERENCE_BACKEND}`, in fp32 on {document['device']}.",
        "",
        f"- **exact**: max |logit diff| <= {document['tolerances']['logits']:g} and max relative gradient diff "
        f"<= {document['tolerances']['grads']:g} (every parameter);",
        "- **contaminated**: runs, but packed examples see each other (the silent failure);",
        "- **unsupported**: the packed forward/backward raises (the note keeps the error);",
        "- no verdict: the tiny copy could not be built or does not run one example at a time (see notes).",
        "",
        f"Columns give the verdict with `use_cache=False` (what `Trainer` uses); `cache` lists the backends that "
        f"are contaminated only with `use_cache=True` (the config default in plain loops: transformers ignores "
        f"packing for sdpa/eager/flex_attention when a cache exists). `max diff` is the packcollate backend's "
        f"(logits, relative gradients).",
        "",
        f"- command: `{document['command']}` ({document['jobs']} worker processes, "
        f"{_duration(document['seconds'])} wall time)",
        f"- transformers {versions['transformers']}, torch {versions['torch']}, Python {versions['python']}",
        f"- coverage: {summary['with_verdict']} of {summary['architectures']} architectures have a verdict "
        f"({100 * summary['coverage']:.1f}%)",
    ]
    for backend in backends:
        for use_cache in (False, True):
            tally = summary["counts"][f"{backend} use_cache={use_cache}"]
            counts = ", ".join(f"{n} {verdict}" for verdict, n in sorted(tally.items(), key=lambda kv: -kv[1]))
            lines.append(f"- {backend}, use_cache={use_cache}: {counts}")
    lines += ["", "| architecture | " + " | ".join(backends) + " | cache | max diff | notes |",
              "| --- | " + " | ".join("---" for _ in backends) + " | --- | --- | --- |"]
    for entry in sorted(document["architectures"], key=lambda e: e["model_type"]):
        lines.append(_matrix_row(entry, backends))
    return "\n".join(lines) + "\n"


def _matrix_row(entry: dict, backends: Sequence[str]) -> str:
    name = f"`{entry['model_type']}`" + (f" {entry['architecture']}" if entry.get("architecture") else "")
    verdicts = [_SHORT[_entry_verdict(entry, b, False)] for b in backends]
    cached = [b for b in backends
              if _entry_verdict(entry, b, True) == CONTAMINATED and _entry_verdict(entry, b, False) != CONTAMINATED]
    ours = next((r for r in entry.get("backends", []) if r["backend"] == attention.BACKEND_NAME), None)
    diff = ""
    if ours is not None and ours["trials"][0]["max_logit_diff"] is not None:
        diff = f"{ours['trials'][0]['max_logit_diff']:.0e}, {ours['trials'][0]['max_grad_rel_diff']:.0e}"
    notes = [f["note"] for f in entry.get("findings", []) if f["status"] != OK and f["note"] and f["name"] != "use_cache"]
    if entry.get("error"):
        notes.insert(0, "no verdict: " + entry["error"])
    notes += [f"{r['backend']} {r['note']}" for r in entry.get("backends", [])
              if r["verdict"] == UNSUPPORTED and r["backend"] != "flex_attention" and r["note"]]
    cells = [name, *verdicts, ", ".join(cached), diff, "; ".join(notes)]
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"
