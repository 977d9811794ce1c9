"""The numeric proof: a tiny random copy of an architecture, a packed batch, and each attention backend
compared with the same examples one at a time (forward and backward), shared by `check_model` and
the guards."""

from __future__ import annotations

import copy
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from ..backend import prepare
from ..collate.text import PackedCollator
from ..errors import BackendRefused, one_line
from ..layout import BACKEND_NAME
from .equivalence import (
    Equivalence,
    Run,
    compare_runs,
    on_device,
    packed_run,
    reference_run,
    switched_backend,
)
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
    Finding,
    Trial,
)
from .static_checks import forward_parameters
from .tiny import seeded, tiny_config


def tiny_model(model_class: type, config: PretrainedConfig, device) -> torch.nn.Module:
    """A tiny random copy of `model_class` with `config`'s structure: fp32, eval mode, eager attention,
    prepared (`packcollate.prepare`); built from seed 0 without touching the caller's random stream.

    MoE routers' auxiliary loss is off: it depends on the whole batch by design (not attention).
    """
    tiny = tiny_config(config)
    if getattr(tiny, "output_router_logits", False):
        tiny.output_router_logits = False
    with seeded(0):
        try:
            model = model_class._from_config(tiny, attn_implementation=REFERENCE_BACKEND)
        except ValueError:  # a model without eager attention: its default
            model = model_class._from_config(tiny)
    return prepare(model.to(device=device, dtype=torch.float32).eval())


def _flex_unavailable(device) -> str | None:
    """Why flex_attention cannot train here (a one-call probe), or None."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:
        return f"this torch has no flex_attention ({error})"
    q = torch.ones(1, 1, 8, 16, device=device, requires_grad=True)  # no draw from the caller's random stream
    try:
        flex_attention(q, q, q).sum().backward()
    except Exception as error:  # noqa: BLE001 - the reason is the report
        return f"{one_line(error)} (probe on {device}; the model was not run)"
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
    backends.append(BACKEND_NAME)
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        backends.append("flash_attention_2")
    return backends


def trial_of(use_cache: bool, equivalence: Equivalence, tolerance: tuple[float, float]) -> Trial:
    exact = equivalence.max_logit_diff <= tolerance[0] and equivalence.max_grad_rel_diff <= tolerance[1]
    return Trial(
        use_cache, EXACT if exact else CONTAMINATED, equivalence.max_logit_diff, equivalence.max_grad_rel_diff,
        equivalence.loss_diff, equivalence.worst_parameter,
    )


@dataclass
class Proof:
    """What every backend's trials share: the packed batch and the reference run. `positions_only`: the same
    packed batch without `cu_seq_lens_*` (transformers' `DataCollatorWithFlattening` default), which the
    packcollate backend's trials run too (None when the batch carries none)."""

    features: list[dict]
    collator: PackedCollator
    batch: dict
    n_real: int
    reference: Run
    device: torch.device
    positions_only: dict | None = None


def prepare_proof(model, features, collator, device) -> Proof:
    """The packed batch and the reference: each example alone through eager, fp32, no cache."""
    batch = on_device(collator(features, return_tensors="pt"), device)
    n_real = int(collator.prepare(features).lengths.sum())
    with switched_backend(model, REFERENCE_BACKEND):
        reference = reference_run(model, features, collator, "unpacked", False, device)
    if not bool(torch.isfinite(reference.logits).all()):
        raise FloatingPointError("the reference logits are not finite")
    positions_only = None
    if collator.return_flash_attn_kwargs:
        positions_only = on_device(PackedCollator(**{**collator_options(collator), "return_flash_attn_kwargs": False})(
            features, return_tensors="pt"), device)
    return Proof(features, collator, batch, n_real, reference, device, positions_only)


def prove_backend(model, proof: Proof, backend: str) -> BackendResult:
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
        trials = [Trial(use_cache, UNSUPPORTED, error=one_line(error)) for use_cache in (False, True)]
    return BackendResult(backend, trials)


@contextmanager
def _backend_model(model, backend: str):
    """`model` switched to `backend`; for models that only take a backend when built (RWKV, GPT-J on
    transformers 5.17), a twin built with it, loaded with the same weights and prepared."""
    try:
        switch = switched_backend(model, backend)
        switch.__enter__()
    except BackendRefused as refused:
        try:
            twin = type(model)._from_config(copy.deepcopy(model.config), attn_implementation=backend)
        except (ValueError, KeyError, ImportError):  # not buildable with it either: report the refusal
            raise refused from None
        twin.load_state_dict(model.state_dict())
        yield prepare(twin.to(device=next(model.parameters()).device, dtype=torch.float32).eval())
        return
    try:
        yield model
    finally:
        switch.__exit__(None, None, None)


def _run_trial(model, proof: Proof, backend: str, use_cache: bool) -> Trial:
    """The packed batch through `backend`; on the packcollate backend, also the batch that carries its layout in
    `position_ids` only (the worse of the two is the verdict: both routes must keep the examples apart)."""
    batches = {"": proof.batch}
    if backend == BACKEND_NAME and proof.positions_only is not None:
        batches["position_ids only: "] = proof.positions_only
    trials = []
    for carrier, batch in batches.items():
        try:
            if backend in HALF_PRECISION_BACKENDS:
                return half_precision_trial(model, proof, use_cache)
            packed = packed_run(model, batch, proof.n_real, use_cache)
        except Exception as error:  # noqa: BLE001 - a backend that raises is unsupported
            return Trial(use_cache, UNSUPPORTED, error=carrier + one_line(error))
        trials.append(trial_of(use_cache, compare_runs(packed, proof.reference), (LOGIT_TOLERANCE, GRAD_TOLERANCE)))
    return max(trials, key=lambda trial: (trial.verdict != EXACT, trial.max_logit_diff))


def half_precision_trial(model, proof: Proof, use_cache: bool) -> Trial:
    """bf16 kernels: packed vs the same backend one example at a time, both bf16, on a copy (a round
    trip through bf16 would round the weights every later fp32 trial compares against)."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    packed = packed_run(model, proof.batch, proof.n_real, use_cache)
    reference = reference_run(model, proof.features, proof.collator, "unpacked", False, proof.device)
    return trial_of(use_cache, compare_runs(packed, reference), (BF16_TOLERANCE, BF16_TOLERANCE))


def proof_collator(model_class: type, position_start: int, recurrent: Finding) -> PackedCollator:
    """The collator the architecture needs: position offset, seq_idx, flash kwargs only if forward takes them."""
    names, var_keyword = forward_parameters(model_class)
    return PackedCollator(
        position_ids_start=position_start,
        return_seq_idx="PackedCollator(return_seq_idx=True)" in recurrent.fix and ("seq_idx" in names or var_keyword),
        return_flash_attn_kwargs=var_keyword or "cu_seq_lens_q" in names,
    )


def collator_options(collator: PackedCollator) -> dict:
    return {
        "position_ids_start": collator.position_ids_start,
        "return_seq_idx": collator.return_seq_idx,
        "return_flash_attn_kwargs": collator.return_flash_attn_kwargs,
    }


@contextmanager
def one_thread():
    """Tiny copies run on one CPU thread: faster than several for 64-wide layers, and much faster on a
    loaded machine. The thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
