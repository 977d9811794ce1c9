"""Rollouts (prompt + completion rows, as RL trainers hold them padded) packed into one row, and their
per-token values laid back out padded.

TRL's GRPO/RLOO trainers hold a batch of `B` rollouts as `input_ids` `(B, P+C)`: left-padded prompts
then right-padded completions, with an `attention_mask` `(B, P+C)` that is 0 on padding and on
completions the trainer masks out (`mask_truncated_completions`). They score the last `C` positions:
the log-probability of every completion token `(B, C)`.

    rollouts = PackedRollouts.of(input_ids, attention_mask, completion_width=C)
    out = model(**rollouts.model_inputs(), labels=rollouts.labels, fused_lm_head=True)  # (1, N-1) per token
    logps = rollouts.padded(out.log_probs)                  # (B, C), 0 where nothing was scored

Only real tokens enter the row: each rollout's prompt + completion, no padding; a rollout whose
completion is entirely masked out enters with no token at all (it scores nothing, its row of the
padded output is 0, as TRL's padded forward leaves it). When no rollout has a completion token left,
the first rollout's prompt runs alone, scoring nothing: a training step still has a graph through the
model (a zero loss, zero gradients), as TRL's padded forward gives. `chunks(max_tokens=…)` splits the rollouts
into token-budget pieces (order kept) whose padded outputs add up to the whole's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..layout import IGNORE_INDEX, packing_keys, to_torch


@dataclass
class PackedRollouts:
    """Rollouts of a padded `(B, L)` batch as one packed row of `N` real tokens.

    Attributes:
        batch_ids: `(B, L)`, the padded batch's tokens.
        input_ids: `(1, N)` int64, the kept tokens of every packed rollout, in row order.
        labels: `(1, N)` int64, the completion tokens; `IGNORE_INDEX` on prompts (and so on the first
            token of every rollout).
        layout: `position_ids` `(1, N)`, `cu_seq_lens_q/_k` `(k+1,)` int32, `max_length_q/_k` of the
            `k` packed rollouts.
        keep: `(B, L)` bool, where the packed tokens sit in the padded batch.
        rows: `(k,)` int64, the padded row of every packed rollout.
        completion_width: `C`, the last columns that are completion.
    """

    batch_ids: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    layout: dict
    keep: torch.Tensor
    rows: torch.Tensor
    completion_width: int

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int) -> PackedRollouts:
        """Pack the rows of `input_ids` `(B, L)` where `attention_mask` `(B, L)` is 1; the last
        `completion_width` columns are the completion. A row whose completion has no token under the
        mask is left out (see the module docstring); a kept row needs at least one prompt token."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise InputError(f"input_ids, attention_mask: expected two (B, L) tensors, got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        width = input_ids.shape[1]
        if not 0 < completion_width <= width:
            raise InputError(f"completion_width: expected 1 to {width} (the columns of input_ids), got {completion_width}")
        mask = attention_mask.bool()
        prompt_tokens = mask[:, : width - completion_width].sum(1)
        completion_tokens = mask[:, width - completion_width:].sum(1)
        scored = completion_tokens > 0
        needs_prompt = scored if bool(scored.any()) else torch.arange(len(mask), device=mask.device) == 0
        bad = (needs_prompt & (prompt_tokens == 0)).nonzero().flatten().tolist()
        if bad:
            raise InputError(f"rollout {bad[0]}: expected at least one prompt token before its completion (the first "
                             "completion token is predicted from it), got an empty prompt")
        if not bool(scored.any()):  # nothing to score: the first prompt alone, so a training step keeps its graph
            return cls.from_keep(input_ids, mask & (torch.arange(len(mask), device=mask.device) == 0).unsqueeze(1),
                                 completion_width)
        return cls.from_keep(input_ids, mask & scored.unsqueeze(1), completion_width)

    @classmethod
    def from_keep(cls, input_ids: torch.Tensor, keep: torch.Tensor, completion_width: int) -> PackedRollouts:
        """Pack the tokens of `input_ids` `(B, L)` where `keep` `(B, L)` bool is True (rows with none are left out)."""
        rows = keep.any(1).nonzero().flatten()
        lengths = keep[rows].sum(1)
        tokens = input_ids[keep].unsqueeze(0)
        completion = torch.zeros_like(keep)
        completion[:, keep.shape[1] - completion_width:] = True
        labels = tokens.masked_fill(~completion[keep].unsqueeze(0), IGNORE_INDEX)
        layout = to_torch(packing_keys(lengths.cpu().numpy().astype(np.int64))) if rows.numel() else {}
        layout = {key: value.to(input_ids.device) if isinstance(value, torch.Tensor) else value
                  for key, value in layout.items()}
        return cls(input_ids, tokens, labels, layout, keep, rows, completion_width)

    @property
    def num_tokens(self) -> int:
        """`N`, the tokens of the packed row."""
        return self.input_ids.shape[1]

    def lengths(self) -> torch.Tensor:
        """`(k,)` int64 tokens of every packed rollout."""
        return self.keep[self.rows].sum(1)

    def model_inputs(self) -> dict:
        """`input_ids` and the layout keys: what the model's forward takes (with `labels`)."""
        return {"input_ids": self.input_ids, **self.layout}

    def padded(self, next_token_values: torch.Tensor) -> torch.Tensor:
        """Per-token values of the packed forward back in the padded batch's completion columns.

        `next_token_values`: `(1, N-1)`, position `j` about token `j+1` (a causal LM's shifted outputs,
        e.g. TRL's fused `log_probs` / `entropy`). Returns `(B, C)`: the value of every kept completion
        token, 0 elsewhere (padding, masked-out rollouts). Differentiable in `next_token_values`."""
        values = next_token_values.reshape(-1)
        if values.numel() != max(self.num_tokens - 1, 0):
            raise InputError(f"next_token_values: expected {self.num_tokens - 1} values (one per packed token but the "
                             f"first), got shape {tuple(next_token_values.shape)}")
        aligned = torch.cat([values.new_zeros(1), values])  # token t's value at t (t >= 1)
        out = aligned.new_zeros(self.keep.shape)
        out = out.index_put((self.keep,), aligned) if self.num_tokens else out
        return out[:, self.keep.shape[1] - self.completion_width:]

    def chunks(self, max_tokens: int | None = None, max_rollouts: int | None = None) -> list[PackedRollouts]:
        """Consecutive pieces of at most `max_tokens` tokens (a rollout longer than the budget raises)
        or at most `max_rollouts` rollouts; each covers the same `(B, L)` batch, and their `padded`
        outputs add up to the whole's."""
        lengths = self.lengths().tolist()
        if max_tokens is not None:
            over = [i for i, n in enumerate(lengths) if n > max_tokens]
            if over:
                row = int(self.rows[over[0]])
                raise InputError(f"rollout {row}: expected at most max_tokens_per_batch={max_tokens} tokens (prompt + "
                                 f"completion), got {lengths[over[0]]}; raise max_tokens_per_batch or lower "
                                 "max_prompt_length / max_completion_length")
        groups, current, used = [], [], 0
        for i, n in enumerate(lengths):
            full_tokens = max_tokens is not None and used + n > max_tokens
            full_rollouts = max_rollouts is not None and len(current) == max_rollouts
            if current and (full_tokens or full_rollouts):
                groups.append(current)
                current, used = [], 0
            current.append(i)
            used += n
        if current:
            groups.append(current)
        return [self.subset(group) for group in groups]

    def subset(self, members: list[int]) -> PackedRollouts:
        """The packed rollouts `members` (indices into `rows`), in the same `(B, L)` batch."""
        keep = torch.zeros_like(self.keep)
        keep[self.rows[members]] = self.keep[self.rows[members]]
        return PackedRollouts.from_keep(self.batch_ids, keep, self.completion_width)
