"""`check_model`: resolve the target, build a tiny random copy, run the static checks and prove every
attention backend numerically (packed == unpacked, forward and backward)."""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from ..backend import attention
from ..collate.text import PackedCollator
from .configs import load_local_config
from .equivalence import (
    BackendRefused,
    Equivalence,
    _attn_implementation,
    _equivalence,
    _on_device,
    _packed_run,
    _reference_run,
    _Run,
)
from .remote_code import check_remote_code
from .report import (
    BF16_TOLERANCE,
    CONTAMINATED,
    EXACT,
    GRAD_TOLERANCE,
    HALF_PRECISION_BACKENDS,
    LOGIT_TOLERANCE,
    REFERENCE_BACKEND,
    UNSUPPORTED,
    BackendResult,
    CompatReport,
    Finding,
    Trial,
    _one_line,
)
from .static_checks import (
    _forward_parameters,
    _position_start,
    check_attention_direction,
    check_context_length,
    check_layout_route,
    check_position_ids,
    check_position_offset,
    check_recurrent_layers,
    check_rope_sections,
    check_use_cache,
)
from .tiny import _default_config, proof_features, tiny_config
from ..backend.unwrap import unwrap_model, unwrapped_class

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
        hint = " (its config names remote code: pass --trust-remote-code, trust_remote_code=True)" if auto_map else ""
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
        inner = unwrap_model(target)  # PEFT, torch.compile, DDP, FSDP, accelerate wrappers
        if not isinstance(getattr(inner, "config", None), PretrainedConfig):
            raise TypeError(f"target: expected a transformers model with a .config, got {type(target).__name__}")
        cls = unwrapped_class(target)
        return _Target(cls.__name__, inner.config.model_type, cls, inner.config)
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
    """bf16 kernels: packed vs the same backend one example at a time, both bf16, on a copy (a round
    trip through bf16 would round the weights every later fp32 trial compares against)."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    packed = _packed_run(model, proof.batch, proof.n_real, use_cache)
    reference = _reference_run(model, proof.features, proof.collator, "unpacked", False, proof.device)
    return _trial(use_cache, _equivalence(packed, reference), (BF16_TOLERANCE, BF16_TOLERANCE))


def _proof_collator(model_class: type, position_start: int, recurrent: Finding) -> PackedCollator:
    """The collator the architecture needs: position offset, seq_idx, flash kwargs only if forward takes them."""
    names, var_keyword = _forward_parameters(model_class)
    return PackedCollator(
        position_ids_start=position_start,
        return_seq_idx="PackedCollator(return_seq_idx=True)" in recurrent.fix and ("seq_idx" in names or var_keyword),
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
        check_position_offset(config, model), check_attention_direction(model), check_rope_sections(config), recurrent,
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
