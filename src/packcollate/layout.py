"""Checks of the packed layout a caller hands the attention backend, before it is trusted.

The backend keeps examples apart using `cu_seq_lens_q` `(k+1,)`, `position_ids` `(B|1, S)` and a
`(B, S)` padding mask. A malformed one would silently mix examples (non-monotonic boundaries, ids
of another length) or fail deep inside a kernel (an IndexError, a shape error): these functions
raise a ValueError saying which argument, what was expected and what was given instead.
"""

from __future__ import annotations

import numpy as np
import torch

#: The label of a token that is not a target (the first token of every example, prompt tokens, padding).
IGNORE_INDEX = -100


def _shape(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def check_cu_seq_lens_type(cu_seq_lens, name: str = "cu_seq_lens_q") -> None:
    """A `(k+1,)` integer tensor; a list or a float tensor is refused (the collator returns tensors)."""
    if not isinstance(cu_seq_lens, torch.Tensor):
        raise ValueError(
            f"{name}: expected a (k+1,) int32 torch tensor of cumulative lengths, got {type(cu_seq_lens).__name__} "
            f"{cu_seq_lens!r:.60}; pass torch.tensor(..., dtype=torch.int32)"
        )
    if cu_seq_lens.dim() != 1 or cu_seq_lens.numel() < 2:
        raise ValueError(
            f"{name}: expected a (k+1,) tensor of cumulative lengths, got {_shape(cu_seq_lens)}"
            + (" (accelerate's dispatch_batches, its default for an IterableDataset, slices every tensor along dim 0: "
               "train with PackedTrainer, or TrainingArguments(accelerator_config={'dispatch_batches': False}))"
               if cu_seq_lens.numel() == 1 else "")
        )
    if cu_seq_lens.dtype.is_floating_point or cu_seq_lens.dtype.is_complex or cu_seq_lens.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {cu_seq_lens.dtype}")


def check_cu_seq_lens(cu_seq_lens: torch.Tensor, batch: int, seq: int, max_length=None,
                      name: str = "cu_seq_lens_q") -> int:
    """Validate `(k+1,)` cumulative lengths covering the `batch * seq` tokens; return `max(l_i)`.

    Expected: `[0, l_0, l_0+l_1, …, batch * seq]`, strictly increasing (every sequence at least one
    token), and `max_length` (when given) at least the longest sequence. One device read.
    """
    check_cu_seq_lens_type(cu_seq_lens, name)
    values = cu_seq_lens.detach().to("cpu", torch.int64).numpy()
    total = batch * seq
    if values[0] != 0:
        shown = values[:8].tolist()
        raise ValueError(f"{name}: expected cumulative lengths starting at 0, got {shown}{'...' if len(values) > 8 else ''}")
    steps = np.diff(values)
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0])
        raise ValueError(
            f"{name}: expected strictly increasing cumulative lengths (every sequence at least one token), got "
            f"{int(values[i])} then {int(values[i + 1])} at entries {i} and {i + 1}"
        )
    if values[-1] != total:
        raise ValueError(
            f"{name}: expected it to end at the batch's {total} tokens ({batch} x {seq}), got {int(values[-1])}; "
            f"was the batch cut or padded after collation?"
        )
    longest = int(steps.max())
    if max_length is not None and int(max_length) < longest:
        raise ValueError(
            f"max_length_q: expected at least the longest sequence of {name} ({longest}), got {int(max_length)}"
        )
    return longest


def checked_position_ids(position_ids, batch: int, seq: int) -> torch.Tensor | None:
    """`position_ids` when they are one `(B|1, S)` section, None when absent or multi-section
    (multimodal rotary embeddings, 3-D); a 2-D tensor of another shape raises."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return None
    if position_ids.shape[-1] != seq or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids: expected shape ({batch}, {seq}) or (1, {seq}) like the query's tokens, got "
            f"{tuple(position_ids.shape)}; positions of another length cannot say where the examples start"
        )
    return position_ids


def check_padding_mask(attention_mask: torch.Tensor, batch: int, seq: int) -> None:
    """A `(B, S)` padding mask given directly (1 = real token, 0 = padding): bool or integer, the
    query's shape."""
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise ValueError(
            f"attention_mask: expected a (B, S) bool or integer padding mask (1 = token, 0 = padding), got dtype "
            f"{attention_mask.dtype}"
        )
    if tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(
            f"attention_mask: expected a padding mask of shape ({batch}, {seq}) like the query, got "
            f"{tuple(attention_mask.shape)}"
        )


def checked_block_ids(block_ids, batch: int, seq: int) -> torch.Tensor | None:
    """`bidirectional_block_ids` `(B|1, S)` integer (-1: an ordinary token; tokens of one id >= 0 in
    one sequence attend to each other in both directions), as `(B, S)`; None when absent."""
    if block_ids is None:
        return None
    if not isinstance(block_ids, torch.Tensor):
        raise ValueError(
            f"bidirectional_block_ids: expected a ({batch}, {seq}) integer torch tensor, got {type(block_ids).__name__}"
        )
    if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex or block_ids.dtype == torch.bool:
        raise ValueError(f"bidirectional_block_ids: expected an integer tensor (-1 outside blocks), got dtype {block_ids.dtype}")
    if block_ids.dim() != 2 or block_ids.shape[-1] != seq or block_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"bidirectional_block_ids: expected shape ({batch}, {seq}) or (1, {seq}) like the query's tokens, got "
            f"{tuple(block_ids.shape)}; were the batch's tokens cut or padded after collation?"
        )
    return block_ids.expand(batch, seq)
