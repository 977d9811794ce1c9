"""The `packcollate` attention backend under `torch.compile`: the same semantics, traced as one graph.

The eager backend derives the sequence layout once per forward (a device sync, Python lists, a cache
keyed by tensor identity) and runs each bucket of similar-length sequences as its own SDPA call:
fast, but every one of those steps is a graph break, and the number of buckets depends on the data.
While `torch.compile` traces (`torch.compiler.is_compiling()`), `packcollate_attention` calls
`traceable_attention` instead: tensor operations only, no `.item()`, no data-dependent Python
branch, so a packed forward is one graph and stays one graph when the packed length `N` and the
number of examples `k` change (dynamic shapes; `torch.compile(model, dynamic=True)` or the default
automatic dynamic shapes, which mark them dynamic at the first change).

Each token gets the id of its sequence, `(B, S)` (`layout.traced_sequence_ids`): a new id wherever `cu_seq_lens_q`, `position_ids`
(a position that does not continue the previous one) or this backend's mask (a change of id, padding
0) says a sequence starts, as the eager layout does; chunked-attention layers (Llama 4) also start a
new id every `attention_chunk_size` tokens of an example. Attention is then one SDPA call over the
row with the mask `same id & causal (& sliding window) & real key`, where bidirectional blocks
(`bidirectional_block_ids`) widen `causal` to `causal | same block`: `(B, 1, S, S)` bool, so memory
is quadratic in `S` (as transformers' packed sdpa); the eager path stays linear.
"""

from __future__ import annotations

import torch

from ..layout import traced_sequence_ids
from .kernels import AttentionOptions, dense_attention, same_block


def chunk_size(module) -> int | None:
    """The chunk length of a chunked-attention layer (Llama 4: `attention_chunk_size` on the layers
    `layer_types` marks `"chunked_attention"`), else None."""
    config = getattr(module, "config", None)
    chunk = getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if chunk and types and isinstance(index, int) and index < len(types) and types[index] == "chunked_attention":
        return int(chunk)
    return None


def traceable_attention(module, query, key, value, attention_mask, opts: AttentionOptions, sinks, kwargs: dict,
                        blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention with every sequence kept apart, traceable: q `(B, H, S, D)`, k/v `(B, H_kv, S, D)`
    -> `(B, S, H, D_v)`; padding tokens give 0, as on the eager path. `blocks` `(B, S)`: bidirectional
    block ids (-1 outside blocks) of a causal layer, or None."""
    seq = query.shape[2]
    ids, real = traced_sequence_ids(query.shape[0], seq, query.device, attention_mask, kwargs, chunk_size(module))
    allowed = ids[:, :, None] == ids[:, None, :]  # (B, S, S)
    index = torch.arange(seq, device=query.device)
    distance = index[:, None] - index[None, :]
    if opts.causal:
        ahead = distance >= 0
        if blocks is not None:
            ahead = ahead | same_block(blocks)
        allowed = allowed & ahead
    if opts.sliding_window is not None:
        allowed = allowed & (distance < opts.sliding_window)
        if not opts.causal:
            allowed = allowed & (distance > -opts.sliding_window)
    if real is not None:
        allowed = (allowed & real[:, None, :]) | (distance == 0)  # a padding query sees itself: finite, zeroed below
    out = dense_attention(query, key, value, opts, allowed[:, None], sinks, is_causal=False).transpose(1, 2)
    return out if real is None else out * real[:, :, None, None].to(out.dtype)
