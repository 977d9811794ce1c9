"""Model compatibility: is a packed batch exactly equivalent to the same examples unpacked?

`compare_packed_unpacked` runs one packed forward and backward and the reference (each sequence on
its own, or a padded batch) on the same model, and returns the largest differences of logits, loss
and every parameter's gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def _summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy. logits `(B, L, V)`, labels `(B, L)` (-100 ignored)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


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


def compare_packed_unpacked(
    model: torch.nn.Module,
    features: Sequence[Mapping],
    *,
    collator: PackedCollator | None = None,
    reference: str = "unpacked",
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

    if reference == "padded":
        padded = {k: v.to(device) for k, v in PaddedCollator.like(collator)(features, return_tensors="pt").items()}
        ref_out = model(**padded, use_cache=use_cache)
        ref_out.loss.backward()
        ref_logits = ref_out.logits[padded["attention_mask"].bool()].detach()
        ref_loss = float(ref_out.loss)
    else:
        prepared = collator.prepare(features)
        ids = torch.from_numpy(prepared.tokens["input_ids"]).to(device)
        labels = torch.from_numpy(prepared.tokens["labels"]).to(device)
        n_targets = int((F.pad(labels, (0, 1), value=IGNORE_INDEX)[1:] != IGNORE_INDEX).sum())
        pieces, total = [], 0.0
        for seq_ids, seq_labels in zip(ids.split(prepared.lengths.tolist()), labels.split(prepared.lengths.tolist())):
            seq_out = model(input_ids=seq_ids[None], use_cache=use_cache)
            seq_loss = _summed_token_loss(seq_out.logits, seq_labels[None])
            (seq_loss / max(n_targets, 1)).backward()
            total += float(seq_loss.detach())
            pieces.append(seq_out.logits[0].detach())
        ref_logits = torch.cat(pieces)
        ref_loss = total / max(n_targets, 1)
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    grad_diff, worst = _max_rel_grad_diff(packed_grads, ref_grads)
    return Equivalence(
        max_logit_diff=float((packed_logits.float() - ref_logits.float()).abs().max()),
        loss=float(out.loss),
        reference_loss=ref_loss,
        max_grad_rel_diff=grad_diff,
        worst_parameter=worst,
    )
