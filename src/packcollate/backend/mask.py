"""The mask function of the packcollate backend, registered with transformers' `AttentionMaskInterface`.

transformers calls it once per forward (in `create_causal_mask` and its sliding-window twin) and
hands what it returns to every attention layer as `attention_mask`, even in models whose decoder
layers drop `**kwargs` (StableLM): the robust route by which the packed layout reaches every layer.
It returns a `(B, S)` sequence map, O(S), where it can: the attention backend reads the sequence
boundaries from it (`layout.layout_of_call`).

Layers flagged bidirectional under a causal mask: a model whose text config sets
`use_bidirectional_attention` (its layers say `is_causal=False`) while its own mask function is
causal somewhere (PaliGemma: a bidirectional prefix, a causal answer; the flag only keeps sdpa from
adding a causal flag to that mask) gets transformers' own `(B, 1, S, S_kv)` bool mask, which every
call honours: exact by construction (sliding windows, packed sequences, the prefix rule), with
memory quadratic in `S` like sdpa.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from . import state
from .preparation import require_prepared
from .restart import stateful_classes


def _adjacent_allowed(mask_function, batch: int, length: int, device, ahead: bool = False) -> torch.Tensor | None:
    """`(B, S-1)` bool: may token t attend token t-1 (`ahead`: may token t-1 attend token t)?
    Without `ahead`, False marks the start of a packed sequence.

    Evaluates transformers' index-based mask function on the S-1 adjacent pairs only (O(S), not the
    S x S mask). None when the function cannot be evaluated on index tensors.
    """
    b = torch.arange(batch, device=device)[:, None]
    h = torch.zeros((), dtype=torch.long, device=device)
    q = torch.arange(1, length, device=device)[None, :]
    try:
        allowed = mask_function(b, h, q - 1, q) if ahead else mask_function(b, h, q, q - 1)
    except Exception:  # a non index-based custom mask function: rely on kwargs instead
        return None
    return torch.as_tensor(allowed, device=device).to(torch.bool).expand(batch, length - 1)


def flagged_layers_under_causal_mask(config, mask_function, batch: int, length: int, device) -> bool:
    """Does a model whose layers are flagged bidirectional (`use_bidirectional_attention`: they say
    `is_causal=False`) build a mask that is causal somewhere, a token seeing the one before it but not
    the one after (PaliGemma's answer)? Then only the model's own mask says where its layers are causal.
    Under `torch.compile`, or when the mask function cannot be evaluated on index tensors: True."""
    if not getattr(config, "use_bidirectional_attention", False) or mask_function is None or length < 2:
        return False
    if torch.compiler.is_compiling():
        return True
    back = _adjacent_allowed(mask_function, batch, length, device)
    ahead = _adjacent_allowed(mask_function, batch, length, device, ahead=True)
    return back is None or ahead is None or bool((back & ~ahead).any())


def _transformers_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, kwargs):
    """transformers' own `(B, 1, S, S_kv)` bool mask (never None), which every attention call honours."""
    from transformers.masking_utils import sdpa_mask

    kwargs = {key: value for key, value in kwargs.items() if key != "allow_is_causal_skip"}
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     allow_is_causal_skip=False, **kwargs)


def _longest_example(layout, seq: int) -> tuple[int, int, int]:
    """`(row, column, length)` of the first token of the longest example of `layout` over `(B, S)` tokens."""
    lengths = np.asarray(layout.lengths())
    longest = int(lengths.argmax())
    start = int(layout.cu_seq_lens[longest])
    if layout.token_index is not None:
        start = int(layout.token_index[start])
    return start // seq, start % seq, int(lengths[longest])


def _per_bucket_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     kwargs) -> torch.Tensor | None:
    """For a model whose attention layers run per bucket (`restart.per_bucket_attention_layers`: attention
    computed inside the model, or a layer that reads the 4-D mask itself): eager's 4-D float mask. In a
    packed forward, over the packed row: the mask of its longest example alone, `(1, 1, L, L)`, evaluated
    with `mask_function` at that example's tokens (causal, its sliding window, chunks), which the
    restarted layers cut per bucket to `(G, 1, L_b, L_b)`: `O(L^2)` here, `O(sum G_b * L_b^2)` in the
    layers, never `N x N`. Any other call (no packing, a cache, a tower's own sequence): eager's own mask.

    None for every other model (a dict lookup: no break under `torch.compile`). Raises for a model that
    needs `prepare` and runs outside a prepared forward."""
    config = kwargs.get("config")
    if config is None or not stateful_classes(type(config)):
        return None
    packed = state.current()
    if packed is None:
        require_prepared(config)
    if not packed.attention_per_bucket:  # the prepared model's own layers say so (its modeling file may hold towers)
        return None
    from transformers.masking_utils import eager_mask

    dense = {"dtype": kwargs.get("dtype", torch.float32), "device": kwargs.get("device", "cpu"),
             "use_vmap": kwargs.get("use_vmap", False)}
    layout = packed.layout if packed.active else None
    if (layout is not None and (batch_size, q_length) == packed.shape and q_length == kv_length
            and not (q_offset or kv_offset)):
        _refuse_bidirectional(config, mask_function, batch_size, q_length, dense["device"])
        row, column, width = _longest_example(layout, q_length)
        mask = eager_mask(row + 1, width, width, column, column, mask_function=mask_function, **dense)
        return mask[row:]
    return eager_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                      attention_mask=attention_mask, **dense)


def _refuse_bidirectional(config, mask_function, batch: int, length: int, device) -> None:
    """A model whose attention layers run per bucket gets one example's mask, cut to right-padded buckets: exact
    only for a causal mask. A mask function that lets a token see the next one (bidirectional layers: BigBird,
    Megatron-BERT, RemBERT with their default `is_decoder=False`) would let shorter examples attend to their
    bucket's padding. One line naming the model and the fix."""
    ahead = _adjacent_allowed(mask_function, batch, length, device, ahead=True) if mask_function is not None else None
    if length > 1 and (ahead is None or bool(ahead.any())):
        raise UnsupportedError(
            f"{getattr(config, 'model_type', type(config).__name__)}: its attention is computed inside the model and "
            f"is not causal here (config.is_decoder={getattr(config, 'is_decoder', None)}); packcollate runs such "
            f"layers per packed example with causal masks only: set is_decoder=True to train it as a causal LM, or "
            f"train it with padding (PaddedCollator)"
        )


def _layout_starts(batch: int, length: int, device) -> torch.Tensor | None:
    """`(B, S)` bool, True at every sequence start of the prepared model's call in progress on these tokens
    (`state.called_layout`), or None outside one. transformers looks for packed sequences in `position_ids` only
    without a cache, and some layers get neither `cu_seq_lens` nor `position_ids` (GPTBigCode, Persimmon, CTRL):
    with a cache this map is all they are told."""
    layout = state.called_layout(batch, length)
    if layout is None:
        return None
    first = layout.cu_seq_lens[:-1].long()
    index = (first if layout.token_index is None else layout.token_index[first]).to(device)
    return torch.zeros(batch * length, dtype=torch.bool, device=device).index_fill(0, index, True).view(batch, length)


def packcollate_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask transformers hands to every `packcollate` attention call; `S x S` only where noted.

    Returns:
        - prefill / training (`q_length == kv_length`): a `(B, S)` int32 sequence map, 0 on padding
          and a new id at every sequence start (packed sequences found from `mask_function`), or
          None when each row is one unpadded sequence;
        - with a cache (`q_length != kv_length`, or offsets: decoding, a static cache whose keys
          include unfilled slots, chunked prefill): transformers' own `(B, 1, S, S_kv)` bool mask,
          which knows where the queries sit among the keys;
        - for a model whose layers are flagged bidirectional under a mask that is causal somewhere
          (PaliGemma; see the module docstring): transformers' own mask too;
        - for a model whose attention layers run per bucket (attention computed inside the model:
          BLOOM, MPT, GPT-Neo, …; or a layer that reads the 4-D mask itself: DeepSeek-V3.2's indexer,
          DeepSeek-V4, Doge, …): eager's 4-D mask of the longest packed example alone, cut per
          bucket by the restarted layers (`_per_bucket_mask`), or eager's own mask outside a packed
          forward.

    Raises `NotPreparedError` for a model that carries state along the sequence, computes attention
    inside it or reads the mask in its layers, and runs outside a forward `packcollate.prepare`
    prepared (`preparation.require_prepared`).
    """
    config = kwargs.get("config")
    per_bucket = _per_bucket_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                  attention_mask, kwargs)
    if per_bucket is not None:
        return per_bucket
    device = attention_mask.device if attention_mask is not None else kwargs.get("device", "cpu")
    if (q_length != kv_length or q_offset or kv_offset
            or flagged_layers_under_causal_mask(config, mask_function, batch_size, q_length, device)):
        return _transformers_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                                  kwargs)
    padding = None
    if attention_mask is not None:
        padding = attention_mask[:, -kv_length:].to(torch.bool)
        if padding.shape[-1] != kv_length:
            padding = F.pad(padding, (0, kv_length - padding.shape[-1]), value=False)

    starts = torch.zeros(batch_size, q_length, dtype=torch.bool, device=device)
    packed = False
    compiling = torch.compiler.is_compiling()  # no data-dependent branch: always the map (it may say "one sequence")
    if mask_function is not None and q_length > 1:
        allowed = _adjacent_allowed(mask_function, batch_size, q_length, device)
        if allowed is not None and (compiling or not bool(allowed.all())):
            starts[:, 1:] = ~allowed
            packed = True
    if not compiling and q_length > 1:  # the prepared model's call: its layout, which a cache hides from transformers
        called = _layout_starts(batch_size, q_length, device)
        if called is not None:
            starts |= called
            packed = True
    padded = padding is not None and (compiling or not bool(padding.all()))
    if not packed and not padded:
        return None
    if padded:
        # a padding/real transition starts a new id too, so ids change exactly at sequence boundaries
        starts[:, 1:] |= padding[:, 1:] != padding[:, :-1]
    sequence_map = torch.cumsum(starts, dim=1, dtype=torch.int32) + 1
    if padded:
        sequence_map = sequence_map.masked_fill(~padding, 0)
    return sequence_map
