"""Completion-only labels: which tokens of an example are trained on.

Three sources, all vectorised over the flat batch (`N` tokens in `s` segments):

- per-token masks carried by the examples: `completion_mask` (TRL's prompt/completion format) and
  `assistant_masks` (chat templates with generation markers); a 0 means "not trained on";
- a `response_template` token sequence: tokens up to and including its first occurrence in each
  example are masked (the behaviour of TRL's former `DataCollatorForCompletionOnlyLM`);
- with an `instruction_template` too (multi-turn): every turn from an instruction template up to the
  end of the next response template is masked, so each assistant turn is trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..layout import cumulative

TEMPLATE_MISSING_POLICIES = ("mask", "error")


def as_template(template: Sequence[int] | None, name: str) -> np.ndarray | None:
    """A token template as a `(m,)` int64 array; ValueError for an empty or non-integer one."""
    if template is None:
        return None
    if isinstance(template, str):
        raise InputError(
            f"{name}: expected token ids (e.g. tokenizer.encode(text, add_special_tokens=False)), got the string "
            f"{template!r}"
        )
    arr = np.asarray(template)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise InputError(f"{name}: expected a non-empty flat sequence of token ids, got {template!r}")
    return arr.astype(np.int64)


def find_template(ids: np.ndarray, segment: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Start positions `(matches,)` of `template` in `ids` `(N,)`, never spanning two segments.

    `segment` `(N,)` is the segment index of each token. Vectorised: one comparison per template token.
    """
    m = len(template)
    n = len(ids) - m + 1
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    hit = ids[:n] == template[0]
    for j in range(1, m):  # m is the template length (a handful of tokens), not a token loop
        hit &= ids[j : j + n] == template[j]
    hit &= segment[:n] == segment[m - 1 : m - 1 + n]
    return np.flatnonzero(hit)


def template_label_mask(
    ids: np.ndarray,
    segment_lengths: np.ndarray,
    response_template: np.ndarray,
    instruction_template: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Which tokens are trained on, from token templates.

    Args:
        ids: `(N,)` token ids of all segments.
        segment_lengths: `(s,)` lengths of the segments (examples).
        response_template: `(m,)` tokens that open an answer.
        instruction_template: `(p,)` tokens that open a user turn, or None.

    Returns:
        trained: `(N,)` bool, True for tokens after the end of a response template (and, with an
            instruction template, before the next instruction template).
        missing: `(s,)` bool, segments in which the response template never appears.
    """
    n_tokens = len(ids)
    s = len(segment_lengths)
    segment = np.repeat(np.arange(s, dtype=np.int64), segment_lengths)
    starts = cumulative(segment_lengths)[:-1]
    response_ends = find_template(ids, segment, response_template) + len(response_template)
    missing = np.ones(s, dtype=bool)
    missing[segment[response_ends - 1]] = False

    # Each token's state is decided by the last event at or before it in its segment: a response end
    # opens training (+1); an instruction start or a segment start closes it (-1). Where two events
    # fall on one token, closing wins (written last): a template ending a segment opens nothing in the next.
    event_kind = np.zeros(n_tokens + 1, dtype=np.int8)  # one spare slot for a response ending at N
    if instruction_template is None:
        # Only the first response template of each segment counts.
        first = np.unique(segment[response_ends - 1], return_index=True)[1]
        event_kind[response_ends[first]] = 1
    else:
        event_kind[response_ends] = 1
        event_kind[find_template(ids, segment, instruction_template)] = -1
    event_kind[starts] = -1
    event_kind = event_kind[:n_tokens]
    position = np.arange(n_tokens, dtype=np.int64)
    last_event = np.maximum.accumulate(np.where(event_kind != 0, position, 0))
    trained = event_kind[last_event] == 1
    return trained, missing
