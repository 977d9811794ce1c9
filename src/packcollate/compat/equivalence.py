"""`compare_packed_unpacked`: one packed forward and backward against the reference (each sequence on its
own, or a padded batch, optionally through another attention backend) on the same model; the largest
differences of logits, loss and every parameter's gradient."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backend.preparation import loss_without_shift, use_backend
from ..collate.text import PackedCollator, PaddedCollator
from ..errors import InputError
from ..layout import IGNORE_INDEX
from ..unwrap import unwrap_model


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


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy. logits `(B, L, V)`, labels `(B, L)` (-100 ignored)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@dataclass
class Run:
    """One forward and backward: real-token logits `(N, V)`, mean loss, every parameter's gradient."""

    logits: torch.Tensor
    loss: float
    grads: dict[str, torch.Tensor | None]


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def checked_device(device) -> torch.device:
    """`device` as a `torch.device` this machine has; InputError in one line for a name torch does not know
    (`"tpu"`, `"quantum"`) or a device that is not here (`"cuda"` without a GPU)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    try:
        torch.empty(0, device=parsed)
    except Exception as error:  # noqa: BLE001 - AssertionError (torch without CUDA), RuntimeError, …: one line
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"device: expected a device this machine has, got {device!r} ({message})") from None
    return parsed


def on_device(batch: Mapping, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def packed_run(model, batch: Mapping, n_real: int, use_cache: bool) -> Run:
    """The model's own loss on a packed batch `(1, N)`, backward; gradients are left zeroed. A model whose loss
    does not shift its labels (BART-style decoders: it refuses packed labels) gets no labels, and the shifted
    token loss is taken from its logits, as the one-at-a-time reference takes it."""
    model.zero_grad(set_to_none=True)
    if loss_without_shift(type(unwrap_model(model))) and "labels" in batch:
        labels = batch["labels"]
        out = model(**{key: value for key, value in batch.items() if key != "labels"}, use_cache=use_cache)
        out.loss = summed_token_loss(out.logits, labels) / max(int((labels[..., 1:] != IGNORE_INDEX).sum()), 1)
    else:
        out = model(**batch, use_cache=use_cache)
    out.loss.backward()
    run = Run(out.logits[0, :n_real].detach(), float(out.loss.detach()), gradients(model))
    model.zero_grad(set_to_none=True)
    return run


def reference_run(model, features, collator, reference: str, use_cache: bool, device) -> Run:
    """Forward and backward of the reference (`"unpacked"` or `"padded"`); gradients are left zeroed."""
    model.zero_grad(set_to_none=True)
    if reference == "padded":
        padded = on_device(PaddedCollator.like(collator)(features, return_tensors="pt"), device)
        ref_out = model(**padded, use_cache=use_cache)
        ref_out.loss.backward()
        logits, loss = ref_out.logits[padded["attention_mask"].bool()].detach(), float(ref_out.loss.detach())
    else:
        logits, loss = _unpacked_forward_backward(model, features, collator, use_cache, device)
    run = Run(logits, loss, gradients(model))
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
        seq_loss = summed_token_loss(seq_out.logits, seq_labels[None])
        (seq_loss / n_targets).backward()
        total += float(seq_loss.detach())
        pieces.append(seq_out.logits[0].detach())
    return torch.cat(pieces), total / n_targets


# A parameter's gradient difference is relative to its own largest gradient, but to no less than this
# fraction of the largest gradient of any parameter: a gradient that is zero up to rounding (a top-1
# router whose weight is normalised to 1) has no scale of its own.
GRAD_SCALE_FLOOR = 1e-3


def max_relative_grad_diff(packed: dict, reference: dict) -> tuple[float, str]:
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


def compare_runs(packed: Run, reference: Run) -> Equivalence:
    grad_diff, worst = max_relative_grad_diff(packed.grads, reference.grads)
    return Equivalence(
        max_logit_diff=float((packed.logits.float() - reference.logits.float()).abs().max()),
        loss=packed.loss,
        reference_loss=reference.loss,
        max_grad_rel_diff=grad_diff,
        worst_parameter=worst,
    )


@contextmanager
def switched_backend(model, name: str | None):
    """Temporarily switch `model` to attention backend `name` (None: leave as is; `backend.preparation.use_backend`);
    raises `BackendRefused` when the model keeps its own."""
    previous = model.config._attn_implementation
    if name is None or name == previous:
        yield
        return
    use_backend(model, name)
    try:
        yield
    finally:
        use_backend(model, previous)


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
        raise InputError(f"reference: expected 'unpacked' or 'padded', got {reference!r}")
    collator = collator or PackedCollator()
    device = next(model.parameters()).device
    batch = on_device(collator(features, return_tensors="pt"), device)
    n_real = int(collator.prepare(features).lengths.sum())
    packed = packed_run(model, batch, n_real, use_cache)
    with switched_backend(model, reference_attn_implementation):
        ref = reference_run(model, features, collator, reference, use_cache, device)
    return compare_runs(packed, ref)
