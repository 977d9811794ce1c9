"""Reductions over the segments (examples) of a packed row, from its `cu_seq_lens`.

A packed row holds `k` examples back to back: `N` tokens, `cu_seq_lens = [0, l_0, l_0+l_1, …, N]`
`(k+1,)`. Objectives that need one number per example — DPO's sequence log-probs, a reward model's
score at each example's last token, a loss where every example weighs the same — reduce per-token
values over those segments:

    logps = token_logprobs(logits, labels, cu)     # (1, N): log p(label_t | tokens < t), 0 where ignored
    per_example = segment_sum(logps, cu)           # (k,)
    mean_nll = -segment_mean(logps, cu, mask=labels != -100)   # (k,): mean over each example's targets
    last = segment_last(hidden, cu)                # (k, D): each example's last token

Every function is vectorised (one `index_add` / `scatter_reduce` / gather, no Python loop over tokens
or examples), differentiable in `values`, and equals the per-example loop up to float rounding of
the additions. Per-token inputs may be `(N, ...)` or `(1, N, ...)`; outputs are `(k, ...)`.
`cu_seq_lens` may be int32 or int64, on any device; every segment must hold at least one token.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from ..layout import IGNORE_INDEX
from ..layout import (
    example_index as segment_ids,  # (k+1,) offsets -> (N,) example index of every token
)

__all__ = [
    "from_padded",
    "padding_mask",
    "segment_ids",
    "segment_last",
    "segment_last_index",
    "segment_lengths",
    "segment_mean",
    "segment_starts",
    "segment_sum",
    "to_padded",
    "token_logprobs",
]


def _flat(values: torch.Tensor, cu_seq_lens, name: str = "values") -> tuple[torch.Tensor, torch.Tensor]:
    """`(1, N, ...)` or `(N, ...)` -> `(N, ...)` (`N` read from `cu_seq_lens`; a leading 1 is read as
    the batch dim first), and the checked offsets as int64 on the values' device."""
    values = torch.as_tensor(values)
    cu = _offsets(cu_seq_lens, values.device)
    total = int(cu[-1])
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == total:
        flat = values[0]
    elif values.dim() >= 1 and values.shape[0] == total:
        flat = values
    else:
        raise LayoutError(
            f"{name}: expected one entry per token, (N, ...) or (1, N, ...) with N={total} from cu_seq_lens, "
            f"got shape {tuple(values.shape)}"
        )
    return flat, _checked(cu, total)


def _offsets(cu_seq_lens, device=None) -> torch.Tensor:
    """`cu_seq_lens` as a 1-D int64 tensor of `k+1 >= 2` offsets (on `device`); LayoutError for floats or
    bools (a fractional offset would be truncated) and other shapes. Monotonicity: `_checked`."""
    cu = torch.as_tensor(cu_seq_lens, device=device)
    if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
        raise LayoutError(f"cu_seq_lens: expected integer offsets [0, l_0, l_0+l_1, …, N], got dtype {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise LayoutError(
            "cu_seq_lens: expected a 1-D tensor [0, l_0, l_0+l_1, …, N] of k+1 >= 2 offsets, got shape "
            f"{tuple(cu.shape)}"
        )
    return cu.long()


def _mask(mask, device) -> torch.Tensor:
    """`mask` as a bool tensor on `device`; LayoutError for values other than 0/1 (True/False)."""
    mask = torch.as_tensor(mask, device=device)
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            bad = mask[(mask != 0) & (mask != 1)][0]
            raise LayoutError(f"mask: expected True/False or 0/1 values, got {bad.item()!r}")
        mask = mask.bool()
    return mask


def _checked(cu: torch.Tensor, total: int) -> torch.Tensor:
    """`cu` after checking it describes `total` tokens in segments of at least one token."""
    lengths = cu[1:] - cu[:-1]
    if bool((cu[0] != 0) | (cu[-1] != total) | (lengths < 1).any()):  # one device sync
        empty = (lengths < 1).nonzero().flatten().tolist()
        raise LayoutError(
            f"cu_seq_lens: expected offsets from 0 to N={total} (the tokens given) with every segment at least one "
            f"token long, got first {int(cu[0])}, last {int(cu[-1])}"
            + (f", empty or negative segments at {empty[:5]}" if empty else "")
        )
    return cu


def segment_lengths(cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Tokens of each segment `(k,)` int64 from `cu_seq_lens` `(k+1,)`."""
    cu = _offsets(cu_seq_lens)
    cu = _checked(cu, int(cu[-1]))
    return cu[1:] - cu[:-1]


def segment_starts(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """`(N,)` bool, True at the first token of every segment."""
    cu = _checked(_offsets(cu_seq_lens), total)
    starts = torch.zeros(total, dtype=torch.bool, device=cu.device)
    starts[cu[:-1]] = True
    return starts


def segment_sum(values: torch.Tensor, cu_seq_lens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-segment sums: `(N, ...)` or `(1, N, ...)` -> `(k, ...)`.

    `mask` `(N,)` / `(1, N)` bool, optional: only the tokens where it is True count (the others add 0,
    even when they hold inf or nan).
    """
    flat, cu = _flat(values, cu_seq_lens)
    if mask is not None:
        keep, _ = _flat(_mask(mask, flat.device), cu, "mask")
        if keep.dim() != 1:
            raise LayoutError(f"mask: expected (N,) or (1, N), got shape {tuple(torch.as_tensor(mask).shape)}")
        flat = torch.where(keep.bool().reshape(-1, *([1] * (flat.dim() - 1))), flat, torch.zeros_like(flat))
    out = flat.new_zeros((cu.numel() - 1, *flat.shape[1:]))
    return out.index_add(0, segment_ids(cu, flat.shape[0]), flat)


def segment_mean(values: torch.Tensor, cu_seq_lens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-segment means: `(N, ...)` or `(1, N, ...)` -> `(k, ...)`.

    Without `mask`, the mean over all tokens of each segment. With `mask` `(N,)` / `(1, N)` bool, the
    mean over the tokens where it is True; a segment with none of them gets 0 (its count is clamped
    to 1, as TRL does for empty completions).
    """
    flat, cu = _flat(values, cu_seq_lens)
    if mask is None:
        counts = (cu[1:] - cu[:-1]).to(flat.dtype)
    else:
        counts = segment_sum(_mask(mask, flat.device).to(flat.dtype), cu).clamp(min=1)
    sums = segment_sum(flat, cu, mask)
    return sums / counts.reshape(-1, *([1] * (flat.dim() - 1)))


def segment_last_index(cu_seq_lens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Row index of each segment's last token `(k,)` int64.

    With `mask` `(N,)` / `(1, N)` bool: the last token of each segment where `mask` is True (e.g.
    `input_ids != pad_token_id`, the rule of Hugging Face's sequence-classification heads); a segment
    where it is never True falls back to its first token (what those heads pick in a row of pads).
    """
    cu = _offsets(cu_seq_lens)
    if mask is None:
        cu = _checked(cu, int(cu[-1]))
        return cu[1:] - 1
    keep, cu = _flat(_mask(mask, cu.device), cu, "mask")
    positions = torch.arange(keep.shape[0], device=cu.device)
    candidates = torch.where(keep.bool(), positions, torch.full_like(positions, -1))
    last = torch.full((cu.numel() - 1,), -1, dtype=torch.long, device=cu.device)
    last = last.scatter_reduce(0, segment_ids(cu, keep.shape[0]), candidates, reduce="amax", include_self=True)
    return torch.where(last < 0, cu[:-1], last)


def segment_last(values: torch.Tensor, cu_seq_lens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each segment's last token: `(N, ...)` or `(1, N, ...)` -> `(k, ...)` (e.g. hidden states
    `(1, N, D)` -> `(k, D)`); `mask` as in `segment_last_index`."""
    flat, cu = _flat(values, cu_seq_lens)
    return flat[segment_last_index(cu, None if mask is None else _mask(mask, flat.device))]


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probability of every next-token label, aligned with `labels`: `(1, N, V)`, `(1, N)` -> `(1, N)`.

    `out[0, t] = log_softmax(logits[0, t-1])[labels[0, t]]`: token `t` is predicted from the tokens
    before it. It is 0 where the label is -100, at position 0, and, given `cu_seq_lens`, at the first
    token of every segment (never predicted from the previous example, whatever its label). The
    model's own shifted cross-entropy per token is `-out[0, 1:]`. `(N, V)`, `(N,)` in gives `(N,)` out.
    Computed in float32 (or the logits' dtype when wider).
    """
    labels = torch.as_tensor(labels, device=logits.device)
    if logits.dim() not in (2, 3) or labels.shape != logits.shape[:-1] or (logits.dim() == 3 and logits.shape[0] != 1):
        raise LayoutError(
            f"logits, labels: expected (1, N, V) and (1, N), or (N, V) and (N,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    total = flat_labels.shape[0]
    target = flat_labels[1:].clone()
    if cu_seq_lens is not None:
        cu = _checked(_offsets(cu_seq_lens, logits.device), total)
        target[segment_starts(cu, total)[1:]] = IGNORE_INDEX
    valid = target != IGNORE_INDEX
    vocab = flat_logits.shape[-1]
    out_of_range = valid & ((target < 0) | (target >= vocab))
    if bool(out_of_range.any()):  # one device sync; a label -1 would otherwise be read as token 0
        t = int(out_of_range.nonzero()[0, 0]) + 1
        raise LayoutError(
            f"labels: expected token ids in [0, {vocab}) (the logits' vocabulary) or {IGNORE_INDEX}, got "
            f"{int(flat_labels[t])} at token {t}"
        )
    predicted = flat_logits[:-1]
    predicted = predicted if predicted.dtype == torch.float64 else predicted.float()
    picked = predicted.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1) - predicted.logsumexp(dim=-1)
    out = torch.cat([picked.new_zeros(1), torch.where(valid, picked, torch.zeros_like(picked))])
    return out.reshape(labels.shape)


def padding_mask(cu_seq_lens: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
    """`(k, L)` bool, True at the real tokens of each segment laid out as right-padded rows
    (`L = max_length`, default the longest segment)."""
    lengths = segment_lengths(cu_seq_lens)
    width = int(lengths.max()) if max_length is None else max_length
    if width < int(lengths.max()):
        raise LayoutError(f"max_length: expected at least the longest segment ({int(lengths.max())}), got {width}")
    return torch.arange(width, device=lengths.device) < lengths.unsqueeze(1)


def to_padded(
    values: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int | None = None, fill=0
) -> torch.Tensor:
    """The packed row as right-padded rows: `(N, ...)` or `(1, N, ...)` -> `(k, L, ...)`, `fill` after
    each segment's end. Differentiable in `values`; `from_padded` is its inverse."""
    flat, cu = _flat(values, cu_seq_lens)
    mask = padding_mask(cu, max_length)
    out = flat.new_full((*mask.shape, *flat.shape[1:]), fill)
    return out.index_put((mask,), flat)


def from_padded(values: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Right-padded rows back to one packed row: `(k, L, ...)` -> `(1, N, ...)`."""
    mask = padding_mask(torch.as_tensor(cu_seq_lens, device=values.device), values.shape[1])
    if mask.shape[0] != values.shape[0]:
        raise LayoutError(f"values: expected {mask.shape[0]} rows (one per segment), got {values.shape[0]}")
    return values[mask].unsqueeze(0)
