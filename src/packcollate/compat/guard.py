"""The runtime guards: `assert_packing_safe` (causal LMs; plain loops and `PackingGuardCallback`) and
`assert_sequence_scores_safe` (sequence classifiers scored per packed example; the reward trainer)."""

from __future__ import annotations

import logging

import torch

from ..backend.preparation import check_prepared, prepare
from ..collate.text import PackedCollator
from ..errors import PackingUnsafeError
from ..layout import BACKEND_NAME, packing_keys, to_torch
from ..objectives.scores import packed_sequence_logits
from ..unwrap import unwrap_model, unwrapped_class
from .proof import (
    collator_options,
    one_thread,
    prepare_proof,
    proof_collator,
    prove_backend,
    tiny_model,
)
from .report import CONTAMINATED, LOGIT_TOLERANCE, UNSUPPORTED, BackendResult
from .static_checks import check_recurrent_layers, position_start
from .tiny import proof_features, seeded, tiny_config

logger = logging.getLogger("packcollate")


_GUARD_CACHE: dict[tuple, BackendResult] = {}


def assert_packing_safe(model: torch.nn.Module, *, collator: PackedCollator | None = None, use_cache: bool | None = None) -> None:
    """Raise `PackingUnsafeError` (a `RuntimeError`) if packed batches would silently mix examples in
    `model`'s setup, and `NotPreparedError` if `model` runs on the packcollate backend with layers
    `packcollate.prepare` must restart that it did not (`backend.preparation.check_prepared`).

    Runs the numeric proof once per (class, config, backend, use_cache, collator layout) on a tiny
    random copy (CPU, fp32; the model's own weights are not touched): the model's
    `attn_implementation`, and `use_cache` as given, else `model.config.use_cache`. A backend that
    raises on the tiny copy is not an error here (training would raise loudly anyway): it is logged.

    Args:
        model: the transformers causal LM about to be trained on packed batches, bare or wrapped
            (PEFT, torch.compile, DDP, FSDP, accelerate: see `packcollate.unwrap`).
        collator: the `PackedCollator` in use; its layout options (position offset, seq_idx, flash
            kwargs) are used for the proof.
        use_cache: the `use_cache` the training forward passes (default: the config's).
    """
    model_type, model = unwrapped_class(model), unwrap_model(model)
    config = model.config
    backend = config._attn_implementation or "eager"
    if backend == BACKEND_NAME:
        check_prepared(model)
    use_cache = bool(getattr(config, "use_cache", False)) if use_cache is None else use_cache
    layout = collator_options(collator) if collator is not None else None
    key = (model_type, config.to_json_string(use_diff=False), backend, use_cache, str(layout))
    if key not in _GUARD_CACHE:
        with one_thread():
            _GUARD_CACHE[key] = _guard_proof(model_type, config, backend, use_cache, layout)
    result = _GUARD_CACHE[key]
    trial = result.trial(use_cache)
    if trial.verdict == UNSUPPORTED:
        logger.warning("packcollate could not check packing for %s with %r: %s", model_type.__name__, backend, trial.error)
    elif trial.verdict == CONTAMINATED:
        raise PackingUnsafeError(
            f"packed batches are not safe for {model_type.__name__} with attn_implementation={backend!r} and "
            f"use_cache={use_cache}: on a tiny random copy, packed examples differ from the same examples one at a "
            f"time by {trial.max_logit_diff:.3g} (max |logit diff|) and {trial.max_grad_rel_diff:.3g} (max relative "
            f"gradient diff, {trial.worst_parameter}); expected <= {LOGIT_TOLERANCE:g}. Fix: "
            + ("model.config.use_cache = False for training, or " if use_cache else "")
            + "attn_implementation='packcollate' (see `packcollate check`)"
        )


def _guard_proof(model_type: type, config, backend: str, use_cache: bool, layout: dict | None) -> BackendResult:
    """The proof of one backend on a tiny copy of `model_type` built from `config`."""
    tiny = tiny_model(model_type, config, "cpu")
    if layout is None:
        layout = collator_options(proof_collator(model_type, position_start(config, tiny),
                                                   check_recurrent_layers(config, tiny)))
    proof = prepare_proof(tiny, proof_features(), PackedCollator(**layout), torch.device("cpu"))
    return prove_backend(tiny, proof, backend)


def assert_sequence_scores_safe(model: torch.nn.Module) -> float:
    """Raise `RuntimeError` unless packed scoring equals one-example-at-a-time scoring for `model`'s
    class, config and attention backend; returns the max |logit diff| measured.

    The check runs on a tiny random copy (`compat.tiny_config`, CPU, fp32, `use_cache=False`, the
    model's own weights untouched): `packed_sequence_logits` on a packed row of uneven examples
    against each example's own forward, tolerance `compat.report.LOGIT_TOLERANCE`.
    """
    base = unwrap_model(model)
    backend = base.config._attn_implementation or "eager"
    config = tiny_config(base.config, pad_token_id=0, use_cache=False)
    with seeded(0):
        tiny = prepare(type(base)._from_config(config, attn_implementation=backend).float().eval())
    examples = [torch.tensor(f["input_ids"]) for f in proof_features()]
    lengths = torch.tensor([len(e) for e in examples]).numpy()
    batch = {"input_ids": torch.cat(examples).unsqueeze(0), **to_torch(packing_keys(lengths))}
    with torch.no_grad():
        packed, _ = packed_sequence_logits(tiny, batch)
        alone = torch.cat([tiny(input_ids=e.unsqueeze(0)).logits for e in examples])
    diff = float((packed - alone).abs().max())
    if not diff <= LOGIT_TOLERANCE:
        raise PackingUnsafeError(
            f"packed scoring is not safe for {type(base).__name__} with attn_implementation={backend!r}: on a tiny "
            f"random copy, packed examples' scores differ from the same examples one at a time by {diff:.3g} "
            f"(expected <= {LOGIT_TOLERANCE:g}). Fix: attn_implementation='packcollate'"
        )
    return diff
