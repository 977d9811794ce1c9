"""`assert_packing_safe`: the runtime check for plain training loops (and `PackingGuardCallback`)."""

from __future__ import annotations

import logging

import torch

from ..collate.text import PackedCollator
from .model_check import _collator_options, _one_thread, _prepare_proof, _proof_collator, _prove_backend, _tiny_model
from .report import CONTAMINATED, LOGIT_TOLERANCE, UNSUPPORTED, BackendResult
from .static_checks import _position_start, check_recurrent_layers
from .tiny import proof_features
from ..backend.unwrap import unwrap_model, unwrapped_class

logger = logging.getLogger("packcollate")


_GUARD_CACHE: dict[tuple, BackendResult] = {}


def assert_packing_safe(model: torch.nn.Module, *, collator: PackedCollator | None = None, use_cache: bool | None = None) -> None:
    """Raise `RuntimeError` if packed batches would silently mix examples in `model`'s setup.

    Runs the numeric proof once per (class, config, backend, use_cache, collator layout) on a tiny
    random copy (CPU, fp32; the model's own weights are not touched): the model's
    `attn_implementation`, and `use_cache` as given, else `model.config.use_cache`. A backend that
    raises on the tiny copy is not an error here (training would raise loudly anyway): it is logged.

    Args:
        model: the transformers causal LM about to be trained on packed batches, bare or wrapped
            (PEFT, torch.compile, DDP, FSDP, accelerate: see `packcollate.backend.unwrap`).
        collator: the `PackedCollator` in use; its layout options (position offset, seq_idx, flash
            kwargs) are used for the proof.
        use_cache: the `use_cache` the training forward passes (default: the config's).
    """
    model_type, model = unwrapped_class(model), unwrap_model(model)
    config = model.config
    backend = config._attn_implementation or "eager"
    use_cache = bool(getattr(config, "use_cache", False)) if use_cache is None else use_cache
    layout = _collator_options(collator) if collator is not None else None
    key = (model_type, config.to_json_string(use_diff=False), backend, use_cache, str(layout))
    if key not in _GUARD_CACHE:
        with _one_thread():
            _GUARD_CACHE[key] = _guard_proof(model_type, config, backend, use_cache, layout)
    result = _GUARD_CACHE[key]
    trial = result.trial(use_cache)
    if trial.verdict == UNSUPPORTED:
        logger.warning("packcollate could not check packing for %s with %r: %s", model_type.__name__, backend, trial.error)
    elif trial.verdict == CONTAMINATED:
        raise RuntimeError(
            f"packed batches are not safe for {model_type.__name__} with attn_implementation={backend!r} and "
            f"use_cache={use_cache}: on a tiny random copy, packed examples differ from the same examples one at a "
            f"time by {trial.max_logit_diff:.3g} (max |logit diff|) and {trial.max_grad_rel_diff:.3g} (max relative "
            f"gradient diff, {trial.worst_parameter}); expected <= {LOGIT_TOLERANCE:g}. Fix: "
            + ("model.config.use_cache = False for training, or " if use_cache else "")
            + "attn_implementation='packcollate' (see `packcollate check`)"
        )


def _guard_proof(model_type: type, config, backend: str, use_cache: bool, layout: dict | None) -> BackendResult:
    """The proof of one backend on a tiny copy of `model_type` built from `config`."""
    tiny = _tiny_model(model_type, config, "cpu")
    if layout is None:
        layout = _collator_options(_proof_collator(model_type, _position_start(config, tiny),
                                                   check_recurrent_layers(config, tiny)))
    proof = _prepare_proof(tiny, proof_features(), PackedCollator(**layout), torch.device("cpu"))
    return _prove_backend(tiny, proof, backend)
