"""`tiny_config`: shrink any causal-LM config to a few-thousand-parameter copy that keeps its structure
(attention pattern, GQA ratio, sliding windows, softcapping, experts, layer types)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from ..errors import is_int

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
LAYER_TYPE_KEYS = ("layer_types", "layers_block_type", "block_types", "attn_layers", "attention_layers")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers")
# Mamba-2 style mixers: (heads, head size, inner width, expand); heads * head size == inner width
_SSM_HEAD_KEYS = (
    ("num_heads", "head_dim", None, "expand"),
    ("mamba_n_heads", "mamba_d_head", "mamba_d_ssm", "mamba_expand"),
    ("mamba_num_heads", "mamba_head_dim", None, "expand"),
    ("n_mamba_heads", "mamba_headdim", None, "mamba_expand"),
)
_SPECIAL_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 0}


def _pick_layers(layer_types: list | None, n_layers: int, shared_tail: int = 0, per_type: int = 2) -> list[int]:
    """Indices of the layers to keep: the first `per_type` layers of every layer type (two, so that
    weights shared between layers of a type stay shared), at least the first two layers.

    `shared_tail` last layers that reuse earlier layers' key/value cache (Gemma 3n) are picked on
    their own, so both kinds of layer survive.
    """
    if not layer_types:  # one kind of layer: no list of `n_layers` entries (a config may declare 10**9 layers)
        body = list(range(min(per_type, n_layers - shared_tail)))
        return body + list(range(n_layers - shared_tail, n_layers - shared_tail + min(per_type, shared_tail)))
    types = [str(t) for t in layer_types]
    keep: list[int] = []
    for start, stop in ((0, n_layers - shared_tail), (n_layers - shared_tail, n_layers)):
        seen: dict[str, int] = {}
        for index in range(start, stop):
            if seen.get(types[index], 0) < per_type:
                seen[types[index]] = seen.get(types[index], 0) + 1
                keep.append(index)
    return sorted(keep)


def _first_int(values: dict, keys) -> int | None:
    return next((values[k] for k in keys if is_int(values.get(k))), None)


def _shrink_sizes(values: dict) -> None:
    """Set widths, heads, vocabularies, experts and windows of one config's `to_dict()` in place."""
    original = dict(values)
    for key, value in original.items():
        if not is_int(value):
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
        if is_int(kv_heads) and kv_heads > 0:
            of_heads = of_heads if is_int(of_heads) else kv_heads  # DBRX keeps its query heads elsewhere
            values[key] = 1 if kv_heads == 1 else TINY_HEADS if kv_heads >= of_heads else TINY_HEADS // 2


def _shrink_derived_dims(values: dict, original: dict) -> None:
    """Sizes defined by other sizes keep that definition."""
    heads = _first_int(original, _HEAD_KEYS)
    hidden = _first_int(original, ("hidden_size", "d_model", "n_embd"))
    # MLA: the head size of the rotary part and the query/key head size follow their parts
    if is_int(original.get("head_dim")) and original.get("head_dim") == original.get("qk_rope_head_dim"):
        values["head_dim"] = TINY_ROPE_DIM
    if is_int(original.get("qk_head_dim")):
        values["qk_head_dim"] = values.get("qk_nope_head_dim", 0) + values.get("qk_rope_head_dim", 0)
    # linear attention (gated delta net): value heads keep their multiple of key heads
    if is_int(original.get("linear_num_key_heads")) and is_int(original.get("linear_num_value_heads")):
        ratio = max(original["linear_num_value_heads"] // original["linear_num_key_heads"], 1)
        values["linear_num_key_heads"], values["linear_num_value_heads"] = 2, 2 * ratio
    # partial rotary embeddings (GPT-J, CodeGen) keep their fraction of the head
    full_head = original.get("head_dim") if is_int(original.get("head_dim")) else hidden // heads if hidden and heads else None
    if is_int(original.get("rotary_dim")) and full_head:
        values["rotary_dim"] = max(2, 2 * round(original["rotary_dim"] / full_head * TINY_HEAD_DIM / 2))
    # Zamba: attention over [hidden states, embeddings], twice the hidden size
    if is_int(original.get("attention_hidden_size")) and hidden:
        values["attention_hidden_size"] = original["attention_hidden_size"] * TINY_HIDDEN // hidden
        if is_int(original.get("attention_head_dim")):
            values["attention_head_dim"] = values["attention_hidden_size"] // TINY_HEADS


def _shrink_ssm_heads(values: dict, original: dict) -> None:
    """Mamba-2 style mixers: heads of `TINY_HEAD_DIM` channels filling the inner width."""
    for heads_key, dim_key, inner_key, expand_key in _SSM_HEAD_KEYS:
        if not (is_int(original.get(heads_key)) and expand_key in original):
            continue
        inner = int(original[expand_key] * values.get("hidden_size", TINY_HIDDEN))
        if inner_key is not None and is_int(original.get(inner_key)):
            values[inner_key] = inner
        values[heads_key] = max(inner // TINY_HEAD_DIM, 1)
        if dim_key in original:
            values[dim_key] = TINY_HEAD_DIM


def _shrink_layers(values: dict) -> None:
    """Keep the layers `_pick_layers` picks; per-layer lists and `per_layer_config` follow."""
    layer_types = next((values[k] for k in LAYER_TYPE_KEYS if isinstance(values.get(k), list)), None)
    for key in _LAYER_COUNT_KEYS:
        n_layers = values.get(key)
        if not is_int(n_layers) or n_layers <= 2:
            continue
        types = layer_types if layer_types is not None and len(layer_types) == n_layers else None
        shared = values.get("num_kv_shared_layers")
        shared = shared if is_int(shared) and 0 < shared < n_layers else 0
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
        if is_int(value) and value >= TINY_VOCAB:
            values[key] = small
        elif isinstance(value, list):
            values[key] = [v if not is_int(v) or v < TINY_VOCAB else small for v in value]


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


def default_config(model_type: str) -> PretrainedConfig:
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
    config = default_config(config) if isinstance(config, str) else config
    tiny = _tiny(config)
    for key, value in overrides.items():
        setattr(tiny, key, value)
    return tiny


# the proof's examples: uneven lengths, most longer than the tiny windows and token budgets (8)
PROOF_LENGTHS = (11, 27, 5, 19)


def proof_features(seed: int = 0, lengths: Sequence[int] = PROOF_LENGTHS) -> list[dict]:
    """Random examples `[{"input_ids": [...]}]` inside the tiny vocabulary (ids 3 …, above bos/eos/pad)."""
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, TINY_VOCAB, n).tolist()} for n in lengths]


@contextmanager
def seeded(seed: int = 0):
    """Tiny copies built inside are the same for a seed, and the caller's random stream is untouched
    (the CPU generator is forked: dropout and sampling after a proof follow the user's own seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
