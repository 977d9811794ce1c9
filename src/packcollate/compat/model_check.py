"""`check_model`: resolve the target, build a tiny random copy, run the static checks and prove every
attention backend numerically (packed == unpacked, forward and backward)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from ..errors import InputError, InputTypeError, check_positive_int, one_line
from ..unwrap import unwrap_model, unwrapped_class
from .configs import check_config_values, load_local_config
from .equivalence import checked_device, on_device
from .proof import (
    available_backends,
    collator_options,
    one_thread,
    prepare_proof,
    proof_collator,
    prove_backend,
    tiny_model,
)
from .remote_code import check_remote_code
from .report import REFERENCE_BACKEND, CompatReport
from .static_checks import (
    check_attention_direction,
    check_context_length,
    check_layout_route,
    check_position_ids,
    check_position_offset,
    check_recurrent_layers,
    check_rope_sections,
    check_use_cache,
    position_start,
)
from .tiny import default_config, proof_features

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
        check_remote_code(path, trust_remote_code)
        return load_local_config(path, trust_remote_code=trust_remote_code)
    if path.is_file() and path.suffix == ".json":
        check_remote_code(path.parent, trust_remote_code)
        return load_local_config(path, trust_remote_code=trust_remote_code)
    if str(target) in CONFIG_MAPPING:
        return default_config(str(target))
    try:
        return AutoConfig.from_pretrained(str(target), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise InputError(
            f"target: expected a model, a config, a directory with config.json, a model type (e.g. 'llama') or a "
            f"model id whose config is in the local Hugging Face cache (nothing is downloaded); got {str(target)!r}: "
            f"{one_line(error)}"
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
        hint = " (its config names remote code: pass --trust-remote-code, trust_remote_code=True)" if auto_map else ""
        raise InputError(
            f"model_type {config.model_type!r}: expected an architecture with a causal-LM head "
            f"(AutoModelForCausalLM), got {type(config).__name__}, which has none{hint}"
        )
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # MusicGen: the causal LM is the decoder part of a composite config
    part = next((v for v in vars(config).values() if isinstance(v, model_class.config_class)), None)
    return model_class, config if isinstance(config, model_class.config_class) or part is None else part


def _resolve_target(target, trust_remote_code: bool) -> _Target:
    if isinstance(target, torch.nn.Module):
        inner = unwrap_model(target)  # PEFT, torch.compile, DDP, FSDP, accelerate wrappers
        if not isinstance(getattr(inner, "config", None), PretrainedConfig):
            raise InputTypeError(f"target: expected a transformers model with a .config, got {type(target).__name__}")
        cls = unwrapped_class(target)
        return _Target(cls.__name__, inner.config.model_type, cls, inner.config)
    if isinstance(target, PretrainedConfig):
        model_class, config = _causal_lm(target, trust_remote_code)
        return _Target(type(target).__name__, target.model_type, model_class, config)
    if not isinstance(target, (str, os.PathLike)):
        raise InputTypeError(f"target: expected a model, a config, a path or a model type/id, got {type(target).__name__}")
    loaded = _load_config(target, trust_remote_code)
    model_class, config = _causal_lm(loaded, trust_remote_code)
    return _Target(str(target), loaded.model_type, model_class, config)


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
        max_seq_length: the longest example planned (a positive int), checked against the model's context length.
        trust_remote_code: allow the config's own code (never set unless you pass it).

    Raises InputError (one line) for a device this machine lacks, a `max_seq_length` that is not a positive
    int, or a config no consistent model is built from (a context length of 0 or less, query heads not a
    multiple of the key/value heads): a verdict on another architecture than the one asked about would lie.

    Returns:
        A `CompatReport`: `findings` (see `Finding.name`), per-backend verdicts `exact` /
        `contaminated` / `unsupported` with `use_cache` False and True, and the collator options.
    """
    device = checked_device(device)
    if max_seq_length is not None:
        check_positive_int("max_seq_length", max_seq_length)
    resolved = _resolve_target(target, trust_remote_code)
    check_config_values(resolved.config)
    backends = list(backends) if backends else available_backends(device)
    with one_thread():
        return _check_resolved(resolved, backends, device, max_seq_length)


def _check_resolved(resolved: _Target, backends: list[str], device, max_seq_length: int | None) -> CompatReport:
    """`check_model` once the target is known: static checks, tiny copy, layout probe, proof."""
    config, model_class = resolved.config, resolved.model_class
    report = CompatReport(
        resolved.name, resolved.model_type, model_class.__name__, [check_position_ids(model_class)], [], {},
        device=str(device),
    )
    try:
        model = tiny_model(model_class, config, device)
    except Exception as error:  # noqa: BLE001 - no tiny copy: static findings only
        model, report.error = None, f"could not build a tiny copy: {one_line(error)}"
    recurrent = check_recurrent_layers(config, model)
    report.findings += [
        check_position_offset(config, model), check_attention_direction(model), check_rope_sections(config), recurrent,
        check_context_length(config, max_seq_length), check_use_cache(config),
    ]
    collator = proof_collator(model_class, position_start(config, model), recurrent)
    report.collator_options = collator_options(collator)
    if model is None:
        return report
    features = proof_features()
    report.findings.insert(1, check_layout_route(model, on_device(collator(features, return_tensors="pt"), device)))
    try:
        proof = prepare_proof(model, features, collator, torch.device(device))
    except Exception as error:  # noqa: BLE001 - the tiny copy does not run at all: no verdict
        report.error = f"the tiny copy does not run one example at a time through {REFERENCE_BACKEND}: {one_line(error)}"
        return report
    report.backends = [prove_backend(model, proof, backend) for backend in backends]
    return report
