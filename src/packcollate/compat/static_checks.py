"""Static checks of a model for packing: position_ids, context length, cache, rope sections, position
offsets, recurrent layers, and which route (kwargs, mask, position_ids) carries the layout."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from transformers import PretrainedConfig

from ..backend import packcollate_attention, packcollate_mask, restart
from ..errors import BackendRefused, is_int, one_line
from ..layout import is_sequence_map
from .configs import context_length
from .equivalence import switched_backend
from .report import ERROR, OK, WARNING, Finding
from .tiny import LAYER_TYPE_KEYS, PROOF_LENGTHS, proof_features


def forward_parameters(model_class: type) -> tuple[set[str], bool]:
    """Names of `model_class.forward`'s parameters, and whether it takes `**kwargs`."""
    parameters = inspect.signature(model_class.forward).parameters
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return set(parameters), var_keyword


def check_position_ids(model_class: type) -> Finding:
    """The causal LM's forward must take `position_ids`: they restart at every packed example."""
    names, var_keyword = forward_parameters(model_class)
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


def position_start(config: PretrainedConfig, model: torch.nn.Module | None) -> int:
    """First position id of a sequence: `padding_idx + 1` for RoBERTa-style embeddings, else 0."""
    if model is not None:
        for module in model.modules():
            padding_idx = getattr(module, "padding_idx", None)
            if hasattr(module, "create_position_ids_from_input_ids") and is_int(padding_idx):
                return padding_idx + 1
        return 0
    pad = getattr(config, "pad_token_id", None)
    return pad + 1 if config.model_type in PADDING_OFFSET_MODEL_TYPES and is_int(pad) else 0


def check_position_offset(config: PretrainedConfig, model: torch.nn.Module | None = None) -> Finding:
    """RoBERTa-style models number positions from `pad_token_id + 1`: the collator must too.

    `model` (a tiny copy) is searched for such an embedding; without it the model type decides.
    """
    start = position_start(config, model)
    if start == 0:
        return Finding("position_offset", OK, "positions start at 0")
    pad = getattr(config, "pad_token_id", start - 1)
    start = pad + 1 if is_int(pad) else start  # the user's pad id, not the tiny copy's
    return Finding(
        "position_offset", WARNING,
        f"positions start at padding_idx + 1 = {start} (RoBERTa-style embeddings, pad_token_id={pad}); position ids "
        f"from 0 would shift every token's position",
        f"PackedCollator(position_ids_start={start})", f"position_ids_start={start}",
    )


def _cross_attention(name: str, module: torch.nn.Module) -> bool:
    """Attention over another sequence (an encoder's states, BLT's patches), whose `is_causal=False` says nothing
    about how the tokens attend to each other."""
    last = name.rsplit(".", 1)[-1].lower()
    return "CrossAttention" in type(module).__name__ or "cross" in last or last == "encoder_attn"


def check_attention_direction(model: torch.nn.Module | None) -> Finding:
    """Say when the tiny copy's attention is bidirectional (`is_causal=False` on its attention layers,
    e.g. BERT with `is_decoder=False`): packed is still exact, but each token sees its whole example,
    later tokens included, which next-token training would read as the answer."""
    if model is None:
        return Finding("causality", OK, "unknown (no tiny copy)")
    bidirectional = sorted({type(m).__name__ for name, m in model.named_modules()
                            if getattr(m, "is_causal", None) is False and not _cross_attention(name, m)})
    if not bidirectional:
        return Finding("causality", OK, "causal: each token attends to the earlier tokens of its example")
    is_decoder = getattr(model.config, "is_decoder", None)
    reason = f" (config.is_decoder={is_decoder})" if is_decoder is False else ""
    return Finding(
        "causality", WARNING,
        f"bidirectional: {', '.join(bidirectional)} has is_causal=False{reason}; packing keeps examples apart "
        f"(the proof below is exact), but every token attends to its whole example, later tokens included: "
        f"fine for a masked LM, wrong for next-token training",
        "set config.is_decoder=True to train it as a causal LM" if is_decoder is False else
        "train it with a masked-LM objective, not next-token prediction",
        "bidirectional",
    )


# model types with state carried along the sequence (SSM, short convolution, linear attention, RNN)
RECURRENT_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "jamba", "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "zamba",
    "zamba2", "lfm2", "lfm2_moe", "lfm3", "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
    "qwen4_exp", "qwen4_exp_text", "kimi_linear", "olmo_hybrid", "bailing_hybrid", "recurrent_gemma", "rwkv", "xlstm",
    "minimax",
})
_RECURRENT_LAYER_TYPES = ("mamba", "linear", "conv", "recurrent", "rwkv", "ssm", "deltanet", "hybrid")


def _recurrent_layers(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, tuple[bool, bool]]:
    """Recurrent layer classes that run on `input_ids` `(1, L)` -> (their source mentions seq_idx,
    mentions cu_seq_lens). Layers of towers a text-only forward skips (vision, audio) do not count."""
    candidates = [module for _, module in restart.token_mixers(model)]
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
    types = next((getattr(config, k) for k in LAYER_TYPE_KEYS if isinstance(getattr(config, k, None), list)), [])
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
    restart = (
        "with attn_implementation='packcollate' they restart at every packed example (their own kernels' "
        "seq_idx / cu_seq_lens on CUDA where mamba_ssm / causal_conv1d / fla are installed, else the examples "
        "run apart in length buckets: exact on any device)"
    )
    fix = "attn_implementation='packcollate'"
    if model is None:
        return Finding(
            "recurrent_layers", WARNING,
            f"{names} may carry state along the sequence (model type / layer types); {restart}",
            f"{fix}; PackedCollator(return_seq_idx=True) for CUDA kernels that read it", "recurrent layers",
        )
    if by_seq_idx or by_cu:
        readers = ", ".join(sorted(set(by_seq_idx) | set(by_cu)))
        read = "seq_idx" if not by_cu else "cu_seq_lens_q" if not by_seq_idx else "seq_idx or cu_seq_lens_q"
        return Finding(
            "recurrent_layers", WARNING,
            f"{names} carry state along the sequence; {restart}. Other backends: {readers} read {read}, which only "
            f"the CUDA kernels honour (without them transformers refuses packed batches)",
            fix + ("; PackedCollator(return_seq_idx=True) for their CUDA kernels" if by_seq_idx else ""),
            "restarted by packcollate",
        )
    return Finding(
        "recurrent_layers", WARNING,
        f"{names} carry state along the sequence and read neither seq_idx nor cu_seq_lens: with other backends the "
        f"state of one packed example flows into the next; {restart}",
        fix, "restarted by packcollate only",
    )


ROUTES = ("kwargs", "mask", "position_ids")
_PROBE_BACKEND = "_packcollate_probe"
_PROBE_CALLS: list[dict[str, bool]] = []


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    """The packcollate backend, recording which carriers of the packed layout reached it."""
    _PROBE_CALLS.append({
        "kwargs": kwargs.get("cu_seq_lens_q") is not None,
        "mask": is_sequence_map(attention_mask),
        "position_ids": isinstance(kwargs.get("position_ids"), torch.Tensor),
    })
    return packcollate_attention(module, query, key, value, attention_mask, **kwargs)


def _layout_routes(model: torch.nn.Module, batch: Mapping, use_cache: bool) -> tuple[int, list[str]]:
    """(attention calls, the routes that reached every one) of one packed forward through the probe."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_PROBE_BACKEND, _probe_attention)
    AttentionMaskInterface.register(_PROBE_BACKEND, packcollate_mask)
    _PROBE_CALLS.clear()
    try:
        with switched_backend(model, _PROBE_BACKEND), torch.no_grad():
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
        return Finding("layout_route", WARNING, f"the instrumented forward raised: {one_line(error)}", "", "probe raised")
    calls = max(n for n, _ in seen.values())
    described = "; ".join(
        f"use_cache={use_cache}: {', '.join(routes) or 'none'}" for use_cache, (_, routes) in seen.items()
    )
    internal = sorted({type(layer).__name__ for _, layer in restart.internal_attention_layers(model)})
    if calls == 0 and internal:
        return Finding(
            "layout_route", WARNING,
            f"no attention call goes through transformers' AttentionInterface: {', '.join(internal)} compute "
            f"attention inside the model; with attn_implementation='packcollate' they run their packed examples "
            f"apart (other backends do not decide whether packed examples stay apart)",
            "attn_implementation='packcollate'; trust the numeric proof below", "attention inside the model",
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
