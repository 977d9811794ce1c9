"""What a packed forward hands the layers packcollate restarts: its layout, travelling with the call.

A model prepared by `packcollate.prepare` pushes a `PackedForward` (the call's `(B, S)` tokens and
their packed layout) on a context variable when its forward starts and pops it when the forward
ends; the restarted layers and the mask function read the innermost one with `current()`. A context
variable is per thread (and per asyncio task): two threads running packed batches through one model,
a teacher's forward between a student's forward and backward, or two models at once each see their
own layout. Nothing lives in a process global.

Gradient checkpointing recomputes layers during backward, after their forward has ended: a prepared
model's checkpointed units run what they checkpoint inside the `PackedForward` of the forward that
called them, then and when recomputed (`preparation.py`).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ..layout import SequenceLayout


@dataclass(frozen=True)
class PackedForward:
    """One forward of a prepared model.

    Attributes:
        active: the model runs on the packcollate backend (else its layers run as they are).
        shape: `(B, S)` of the call's tokens, or None when it has none.
        layout: the packed layout of those tokens, or None when each row is one sequence.
        attention_per_bucket: every attention layer of the model runs its packed examples per bucket
            (`restart.per_bucket_attention_layers`: attention computed inside the model, BLOOM, MPT,
            GPT-Neo, …; or a model with a layer that reads the 4-D mask itself, DeepSeek-V3.2, Doge, …):
            the mask function hands it eager's mask of one example, cut per bucket.
    """

    active: bool
    shape: tuple[int, int] | None
    layout: SequenceLayout | None
    attention_per_bucket: bool = False


_STACK: ContextVar[tuple[PackedForward | None, ...]] = ContextVar("packcollate_forward", default=())


def current() -> PackedForward | None:
    """The innermost packed forward of this thread, or None outside any."""
    stack = _STACK.get()
    return stack[-1] if stack else None


def called_layout(batch: int, length: int) -> SequenceLayout | None:
    """The packed layout of the prepared model's call in progress when it is over these `(B, S)` tokens (on the
    packcollate backend), else None: what a layer that gets no layout of its own is part of (with a cache,
    transformers looks for no packed sequences)."""
    packed = current()
    if packed is None or not packed.active or packed.shape != (batch, length):
        return None
    return packed.layout


def push(state: PackedForward | None) -> None:
    """Enter `state` (None: a call that knows no layout, e.g. an unrecorded recomputation)."""
    _STACK.set((*_STACK.get(), state))


def pop() -> None:
    """Leave the innermost state (`push`'s partner, run however the call ends)."""
    _STACK.set(_STACK.get()[:-1])


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (a checkpoint's recomputation)."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1
