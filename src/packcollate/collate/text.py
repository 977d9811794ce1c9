"""Collators: `PackedCollator` (one row, no padding) and `PaddedCollator` (the baseline).

Both share the same label semantics, so a packed and a padded batch of the same examples train on
exactly the same target tokens:

- labels are the examples' `labels`, or a copy of `input_ids`;
- the first token of every sequence gets `separator_id` (-100): nothing predicts it;
- with `completion_only_loss`, tokens masked by `completion_mask` / `assistant_masks` or before a
  `response_template` get -100;
- the length policy (`max_seq_length`, `overflow`) applies to each sequence, never to the packed row.

A packed batch (one row of `N` tokens, plus the padding segment of `pad_to_multiple_of` when set) is
the layout `packcollate.layout` describes, built by `layout.packing_keys`.
No `attention_mask` is emitted: with one, transformers ignores the packing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..errors import InputError, check_non_negative_int
from ..layout import (
    IGNORE_INDEX,
    PACKING_KEYS,
    cumulative,
    packing_keys,
    positions,
    to_torch,
)
from .features import KNOWN_KEYS, MASK_KEYS, flatten_features
from .labels import TEMPLATE_MISSING_POLICIES, as_template, template_label_mask
from .lengths import check_length_policy, plan_lengths

logger = logging.getLogger("packcollate")

RETURN_TENSORS = ("pt", "np")


@dataclass
class CollateStats:
    """Running counts over every batch a collator has made (reset with `reset()`).

    With a `DataLoader` using `num_workers > 0` each worker process keeps its own copy.
    """

    batches: int = 0
    examples: int = 0
    sequences: int = 0
    tokens: int = 0
    padding_tokens: int = 0
    truncated_sequences: int = 0
    truncated_tokens: int = 0
    dropped_sequences: int = 0
    dropped_tokens: int = 0
    split_sequences: int = 0
    missing_template: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **counts: int) -> None:
        """Add `counts` (`name=value`) to the running counts under a lock: a collator called from
        several threads counts every batch."""
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def reset(self) -> None:
        with self._lock:
            for f in fields(self):
                setattr(self, f.name, 0)

    def __getstate__(self) -> dict:  # a lock does not pickle (DataLoader workers, deepcopy)
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


@dataclass
class PreparedBatch:
    """Validated examples after masking and the length policy, before layout.

    Attributes:
        tokens: per-token arrays `(N,)`: `input_ids`, `labels` (int64) and extra per-token keys.
        lengths: `(k,)` int64 sequence lengths (k sequences after the length policy).
        cu_seq_lens: `(k+1,)` int64, `[0, l_0, l_0+l_1, …, N]`.
        passthrough: values of `passthrough_keys`, one per sequence (`k`): an example split into
            pieces, or a pre-packed row, repeats its value for each of its sequences; a dropped
            example's value is dropped with it.
    """

    tokens: dict[str, np.ndarray]
    lengths: np.ndarray
    cu_seq_lens: np.ndarray
    passthrough: dict[str, list]


def _per_sequence(passthrough: dict[str, list], sequence_example: np.ndarray) -> dict[str, list]:
    """Per-example values -> one per sequence; `sequence_example` `(k,)` is each sequence's example."""
    if not passthrough or np.array_equal(sequence_example, np.arange(len(next(iter(passthrough.values()))))):
        return passthrough
    return {key: [values[i] for i in sequence_example.tolist()] for key, values in passthrough.items()}


@dataclass(kw_only=True)
class BaseCollator:
    """Options shared by both collators (documented on `PackedCollator`)."""

    max_seq_length: int | None = None
    overflow: str = "truncate"
    completion_only_loss: bool = True
    response_template: Sequence[int] | None = None
    instruction_template: Sequence[int] | None = None
    on_missing_template: str = "mask"
    separator_id: int = IGNORE_INDEX
    passthrough_keys: Sequence[str] = ()
    return_tensors: str = "pt"
    stats: CollateStats = field(default_factory=CollateStats, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_length_policy(self.max_seq_length, self.overflow)
        if self.return_tensors not in RETURN_TENSORS:
            raise InputError(f"return_tensors: expected one of {RETURN_TENSORS}, got {self.return_tensors!r}")
        if self.on_missing_template not in TEMPLATE_MISSING_POLICIES:
            raise InputError(
                f"on_missing_template: expected one of {TEMPLATE_MISSING_POLICIES}, got {self.on_missing_template!r}"
            )
        self._response = as_template(self.response_template, "response_template")
        self._instruction = as_template(self.instruction_template, "instruction_template")
        if self._instruction is not None and self._response is None:
            raise InputError("instruction_template: expected a response_template too, got only an instruction_template")
        if isinstance(self.passthrough_keys, str):
            raise InputError(f"passthrough_keys: expected a list of key names, got the string {self.passthrough_keys!r}")
        self.passthrough_keys = tuple(self.passthrough_keys)
        reserved = [key for key in self.passthrough_keys if key in KNOWN_KEYS or key in PACKING_KEYS]
        if reserved:
            raise InputError(
                f"passthrough_keys: expected keys the collator neither reads nor emits, got {reserved} (passed "
                f"through, they would replace what the collator computes)"
            )
        check_non_negative_int("pad_token_id", getattr(self, "pad_token_id", 0))
        pad_to = getattr(self, "pad_to_multiple_of", None)
        if pad_to is not None and (not isinstance(pad_to, int) or pad_to < 1):
            raise InputError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to!r}")
        self._warned: set[str] = set()

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("%s (reported once; running counts in collator.stats)", message)

    def _trained_mask(self, flat) -> np.ndarray | None:
        """`(N,)` bool of tokens trained on by completion-only rules, or None when all are."""
        if not self.completion_only_loss:
            return None
        trained = None
        for key in MASK_KEYS:
            if key in flat.tokens:
                trained = flat.tokens[key] if trained is None else trained & flat.tokens[key]
        if self._response is not None:
            by_template, missing = template_label_mask(
                flat.tokens["input_ids"], flat.segment_lengths, self._response, self._instruction
            )
            if missing.any():
                self.stats.add(missing_template=int(missing.sum()))
                first = int(flat.segment_example[np.flatnonzero(missing)[0]])
                message = (
                    f"example {first}: expected the response_template {self._response.tolist()} in every example, "
                    f"got {int(missing.sum())} of {len(missing)} sequences without it"
                )
                if self.on_missing_template == "error":
                    raise InputError(message)
                self._warn_once("missing_template", message + "; their labels are all masked")
            trained = by_template if trained is None else trained & by_template
        return trained

    def prepare(self, features: Sequence[Mapping]) -> PreparedBatch:
        """Validate `features`, build labels, apply the length policy (shared by both layouts)."""
        flat = flatten_features(features, self.passthrough_keys)
        tokens = flat.tokens
        labels = tokens["labels"].copy() if "labels" in tokens else tokens["input_ids"].copy()
        trained = self._trained_mask(flat)
        if trained is not None:
            labels[~trained] = IGNORE_INDEX
        out = {key: value for key, value in tokens.items() if key not in MASK_KEYS}
        out["labels"] = labels

        plan = plan_lengths(flat.segment_lengths, self.max_seq_length, self.overflow, flat.segment_example)
        if plan.keep is not None:
            out = {key: value[plan.keep] for key, value in out.items()}
        lengths = plan.lengths
        if plan.truncated_segments:
            self._warn_once("truncate", f"truncated {plan.truncated_segments} sequences longer than "
                            f"max_seq_length={self.max_seq_length} ({plan.truncated_tokens} tokens removed)")
        if plan.dropped_segments:
            self._warn_once("drop", f"dropped {plan.dropped_segments} sequences longer than "
                            f"max_seq_length={self.max_seq_length} ({plan.dropped_tokens} tokens)")
        source = plan.source
        padding = 0
        if len(lengths) == 0:  # overflow="drop" removed every example: one pad token, no target
            self._warn_once("empty", f"overflow='drop' removed every example of a batch (lengths "
                            f"{flat.segment_lengths.tolist()}): it became one pad token without a target, which "
                            f"adds nothing to the loss")
            fill = {"input_ids": getattr(self, "pad_token_id", 0), "labels": IGNORE_INDEX}
            out = {key: np.full(1, fill.get(key, 0), dtype=value.dtype) for key, value in out.items()}
            lengths, source, padding = np.ones(1, dtype=np.int64), np.zeros(1, dtype=np.int64), 1
        cu_seq_lens = cumulative(lengths)
        out["labels"][cu_seq_lens[:-1]] = self.separator_id
        self.stats.add(
            batches=1, examples=len(flat.example_lengths), sequences=len(plan.lengths), tokens=int(cu_seq_lens[-1]),
            truncated_sequences=plan.truncated_segments, truncated_tokens=plan.truncated_tokens,
            dropped_sequences=plan.dropped_segments, dropped_tokens=plan.dropped_tokens,
            split_sequences=plan.split_segments, padding_tokens=padding,
        )
        return PreparedBatch(out, lengths, cu_seq_lens, _per_sequence(flat.passthrough, flat.segment_example[source]))

    def _finish(self, batch: dict, passthrough: dict[str, list], return_tensors: str | None) -> dict:
        """Convert numpy arrays to the requested tensor type; add passthrough values."""
        return_tensors = return_tensors or self.return_tensors
        if return_tensors not in RETURN_TENSORS:
            raise InputError(f"return_tensors: expected one of {RETURN_TENSORS}, got {return_tensors!r}")
        if return_tensors == "pt":
            batch = to_torch(batch)
        for key, values in passthrough.items():
            try:
                batch[key] = torch.as_tensor(values) if return_tensors == "pt" else np.asarray(values)
            except (TypeError, ValueError, RuntimeError):
                batch[key] = values  # non-numeric or ragged: a plain list, one entry per example
            else:
                if isinstance(batch[key], np.ndarray) and batch[key].dtype.kind not in "biufc":
                    batch[key] = values  # numpy accepts strings and objects; keep "np" like "pt": a list
        return batch


@dataclass(kw_only=True)
class PackedCollator(BaseCollator):
    """Concatenate a batch of examples into one row for padding-free training.

    Use as `Trainer(data_collator=PackedCollator())` or `DataLoader(collate_fn=PackedCollator())`.
    The output follows the table in this module's docstring.

    Args:
        max_seq_length: longest sequence (example) allowed; None for no limit. Bounds each example,
            not the packed row.
        overflow: what to do with a longer sequence: `"truncate"` (default), `"split"`, `"drop"` or
            `"error"` (see `packcollate.collate.lengths`). Truncated and dropped tokens are counted in `stats`
            and reported once in the log.
        completion_only_loss: apply `completion_mask` / `assistant_masks` and the templates to the
            labels (default True); when False, those keys are ignored and every token is trained on.
        response_template: token ids that open an answer; tokens up to and including its first
            occurrence in each example are not trained on.
        instruction_template: token ids that open a user turn (multi-turn); with it, every user turn
            up to the end of the next response template is masked.
        on_missing_template: `"mask"` (default: the example is not trained on, counted in
            `stats.missing_template`) or `"error"`.
        separator_id: label of the first token of each sequence (default -100).
        passthrough_keys: per-example keys returned as a `(k,)` tensor, one value per sequence (or a
            list when not numeric) instead of being rejected; see `PreparedBatch.passthrough`.
        return_tensors: `"pt"` (default) or `"np"`.
        return_flash_attn_kwargs: emit `cu_seq_lens_q/_k` and `max_length_q/_k` (default True).
        return_seq_idx: emit `seq_idx` `(1, N)` int32, for SSM / short-convolution layers.
        position_ids_start: first position id of every sequence (2 for RoBERTa-style models).
        pad_to_multiple_of: append one padding segment (labels -100, its own `cu_seq_lens` entry,
            `seq_idx` k) so that N is a multiple of this; for static shapes or tensor/context parallel.
        pad_token_id: token id of that padding segment.

    Attributes:
        stats: `CollateStats`, running counts (examples, tokens, truncated, dropped, split, …).
    """

    return_flash_attn_kwargs: bool = True
    return_seq_idx: bool = False
    position_ids_start: int = 0
    pad_to_multiple_of: int | None = None
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative_int("position_ids_start", self.position_ids_start)

    def __call__(self, features: Sequence[Mapping], return_tensors: str | None = None) -> dict:
        """Pack `features` (a list of `k` example dicts) into one row; see the class docstring."""
        prepared = self.prepare(features)
        tokens, lengths, cu_seq_lens = prepared.tokens, prepared.lengths, prepared.cu_seq_lens
        if self.pad_to_multiple_of:
            pad = -int(cu_seq_lens[-1]) % self.pad_to_multiple_of
            if pad:
                fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
                tokens = {
                    k: np.concatenate([v, np.full(pad, fill.get(k, 0), dtype=v.dtype)]) for k, v in tokens.items()
                }
                lengths = np.append(lengths, pad)
                cu_seq_lens = np.append(cu_seq_lens, cu_seq_lens[-1] + pad)
                self.stats.add(padding_tokens=pad)
        batch = {key: value[None] for key, value in tokens.items()}
        batch.update(packing_keys(lengths, cu_seq_lens, position_start=self.position_ids_start,
                                  flash_kwargs=self.return_flash_attn_kwargs, seq_idx=self.return_seq_idx))
        return self._finish(batch, prepared.passthrough, return_tensors)


@dataclass(kw_only=True)
class PaddedCollator(BaseCollator):
    """The baseline: one right-padded row per sequence, with `PackedCollator`'s label semantics.

    Takes the same label and length options as `PackedCollator`. A pre-packed row (`seq_lengths`)
    becomes one padded row per sub-sequence, so the batch holds exactly the sequences a packed batch
    keeps apart.

    Output, for `k` sequences padded to `L` (the longest, rounded up to `pad_to_multiple_of`):
    `input_ids` `(k, L)` int64 (pad: `pad_token_id`), `labels` `(k, L)` int64 (pad: -100),
    `attention_mask` `(k, L)` int64, extra per-token keys `(k, L)` (pad: 0), and `position_ids`
    `(k, L)` int64 when `return_position_ids`.

    Args:
        pad_token_id: token id for padding.
        pad_to_multiple_of: round `L` up to a multiple of this.
        return_position_ids: also emit `position_ids` (`0 … l_i-1`, then 0 on padding).
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    return_position_ids: bool = False

    @classmethod
    def like(cls, collator: BaseCollator, **overrides) -> PaddedCollator:
        """A padded collator with the label and length options of `collator` (e.g. a `PackedCollator`)."""
        shared = {f.name: getattr(collator, f.name) for f in fields(BaseCollator) if f.init}
        if hasattr(collator, "pad_token_id"):
            shared["pad_token_id"] = collator.pad_token_id
        return cls(**{**shared, **overrides})

    def __call__(self, features: Sequence[Mapping], return_tensors: str | None = None) -> dict:
        """Pad `features` into a `(k, L)` batch; see the class docstring."""
        prepared = self.prepare(features)
        lengths = prepared.lengths
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = np.repeat(np.arange(len(lengths)), lengths)
        cols = positions(prepared.cu_seq_lens, lengths)
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        batch = {}
        for key, value in prepared.tokens.items():
            padded = np.full((len(lengths), width), fill.get(key, 0), dtype=value.dtype)
            padded[rows, cols] = value
            batch[key] = padded
        attention_mask = np.zeros((len(lengths), width), dtype=np.int64)
        attention_mask[rows, cols] = 1
        batch["attention_mask"] = attention_mask
        if self.return_position_ids:
            position_ids = np.zeros((len(lengths), width), dtype=np.int64)
            position_ids[rows, cols] = cols
            batch["position_ids"] = position_ids
        self.stats.add(padding_tokens=len(lengths) * width - int(prepared.cu_seq_lens[-1]))
        return self._finish(batch, prepared.passthrough, return_tensors)
