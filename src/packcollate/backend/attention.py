"""The `packcollate` attention backend for transformers: padding-free attention on any hardware.

After `import packcollate`, `attn_implementation="packcollate"` works in `from_pretrained`,
`from_config` and `model.set_attn_implementation`. The backend keeps packed examples apart whatever
the model or cache does:

1. The sequence layout comes from the `cu_seq_lens_q/_k` and `max_length_q/_k` kwargs the
   collator emits, and from the mask this backend registers with transformers'
   `AttentionMaskInterface` (it reaches every layer as `attention_mask`, even in models whose
   layers drop kwargs; it carries padding of normal batches and the chunks of chunked-attention
   layers); a sequence starts wherever either says so. Without both, from `position_ids` (a new
   sequence wherever the position does not continue); otherwise each row of the batch is one
   sequence. It never depends on `use_cache`.
2. The kernel is chosen once per call site (device, dtype, features) and reported by `describe()`:
   CUDA + `flash_attn` -> `flash_attn_varlen_func`; CUDA + `torch.nn.attention.varlen.varlen_attn`
   -> PyTorch's own varlen kernel; otherwise exact per-sequence attention (`scaled_dot_product_attention`
   over buckets of similar-length sequences, right-padded inside a bucket, which causal masking
   makes exact). A feature a fast kernel lacks (softcap, attention sinks, dropout, fp32, …) falls
   back to the exact path with a one-time warning naming why.
3. Bidirectional blocks: `bidirectional_block_ids` `(B|1, S)` (the vision collator emits it for
   families whose image tokens attend to each other in both directions, Gemma 3, PaliGemma) lets tokens of
   one block id (>= 0) in one sequence see each other, future ones included; everything else stays
   causal, and a sliding window still bounds how far back a query looks (Gemma 3's rule:
   `window & (causal | same block)`). Only the exact path takes them (on CUDA too, with a warning).
   Blocks shape causal calls only: a layer whose `is_causal` is False, or a caller passing
   `is_causal=False`, attends both ways and ignores them.
4. Layers flagged bidirectional under a causal mask: a model whose text config sets
   `use_bidirectional_attention` (its layers say `is_causal=False`) while its own mask function is
   causal somewhere (PaliGemma: a bidirectional prefix, a causal answer; the flag only keeps sdpa
   from adding a causal flag to that mask) gets transformers' own `(B, 1, S, S_kv)` bool mask from
   this backend's mask function, which every call honours: exact by construction (sliding windows,
   packed sequences, the prefix rule), with memory quadratic in `S` like sdpa.

Shapes (transformers' convention): `query` `(B, H, S, D)`, `key`/`value` `(B, H_kv, S_kv, D)`; the
output is `(B, S, H, D_v)`. Packed batches have `B = 1`, `S = N`.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..layout import (
    check_cu_seq_lens,
    check_cu_seq_lens_type,
    check_padding_mask,
    checked_block_ids,
    checked_position_ids,
)

logger = logging.getLogger("packcollate")

BACKEND_NAME = "packcollate"
#: The kwarg that names bidirectional blocks: `(B|1, S)` integer, -1 outside blocks.
BLOCK_IDS = "bidirectional_block_ids"

EXACT = "exact-sdpa"
TORCH_VARLEN = "torch-varlen"
FLASH_VARLEN = "flash-attn-varlen"

# A bucket of the exact path holds sequences whose lengths are within this ratio of its longest:
# right padding inside a bucket costs at most 1/ratio^2 attention work, and fewer buckets mean
# fewer kernel launches.
BUCKET_RATIO = 0.8
# ... unless the padding would cost less than attention over this many token pairs.
BUCKET_MIN_PAIRS = 64 * 64


# ---------------------------------------------------------------------------------------------
# Features of one attention call
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionOptions:
    """What one attention call asks for.

    Attributes:
        causal: queries see only earlier keys of their sequence.
        scaling: softmax scale (default `D ** -0.5`).
        dropout: attention dropout probability (0 outside training).
        sliding_window: a query sees at most this many keys, itself included (`q - kv < W`), or None.
        softcap: logits become `softcap * tanh(logits / softcap)` (Gemma 2), or None.
        has_sinks: per-head sink logits (`s_aux`, GPT-OSS) join the softmax.
        bidirectional_blocks: tokens of one `bidirectional_block_ids` block see each other.
    """

    causal: bool = True
    scaling: float | None = None
    dropout: float = 0.0
    sliding_window: int | None = None
    softcap: float | None = None
    has_sinks: bool = False
    bidirectional_blocks: bool = False


# ---------------------------------------------------------------------------------------------
# Sequence layout
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SequenceLayout:
    """Where the sequences of a batch are, over its flattened `B * S` tokens.

    Attributes:
        cu_seq_lens: `(k+1,)` int32 on the batch's device, `[0, l_0, l_0+l_1, …, M]`.
        max_length: `max(l_i)`, a Python int.
        token_index: `(M,)` int64, the flat indices of real tokens, or None when all `B * S` are
            real (no padding).
        full_rows: every row of the batch is exactly one sequence (no gather needed).
    """

    cu_seq_lens: torch.Tensor
    max_length: int
    token_index: torch.Tensor | None = None
    full_rows: bool = False
    _buckets: list | None = field(default=None, repr=False)
    _lengths: list[int] | None = field(default=None, repr=False)

    def lengths(self) -> list[int]:
        """Sequence lengths as Python ints (one device sync, then cached)."""
        if self._lengths is None:
            self._lengths = torch.diff(self.cu_seq_lens).tolist()
        return self._lengths


class _LayoutCache:
    """Remember the layout derived from a tensor for as long as that tensor is unchanged.

    Every layer of a forward sees the same `cu_seq_lens_q` / `position_ids` / mask tensor; the
    layout (which may need a device sync) is derived once per forward, not once per layer.

    Bounded: at most `size` entries and `max_tokens` tokens of layouts in all (a bigger batch is not
    cached: its layout, O(N), is derived again in each layer), and an entry goes as soon as its
    tensor is freed. A CPU tensor is also compared with a copy taken when its layout was cached: an
    edit through `.numpy()` or `.data` does not bump `tensor._version`. (On CUDA that comparison
    would cost a device sync per layer: edit there with ordinary in-place operations, or not at all.)
    """

    def __init__(self, size: int = 8, max_tokens: int = 1 << 20):
        self.size = size
        self.max_tokens = max_tokens
        # (weak reference, version, extra key, layout, tokens, CPU copy or None)
        self.entries: list[tuple] = []

    def get(self, tensor: torch.Tensor, extra: tuple) -> SequenceLayout | None:
        if tensor.is_inference():  # no version counter (torch.inference_mode): never cached
            return None
        for ref, version, key, layout, _, copy in self.entries:
            if ref() is tensor and version == tensor._version and key == extra:
                return layout if copy is None or torch.equal(copy, tensor) else None
        return None

    def _drop(self, ref: weakref.ref) -> None:
        self.entries = [e for e in self.entries if e[0] is not ref]

    def put(self, tensor: torch.Tensor, extra: tuple, layout: SequenceLayout, tokens: int) -> SequenceLayout:
        if tensor.is_inference() or tokens > self.max_tokens:
            return layout
        entries = [e for e in self.entries if e[0]() is not None and not (e[0]() is tensor and e[2] == extra)]
        entries = entries[-(self.size - 1) :]
        while entries and sum(e[4] for e in entries) + tokens > self.max_tokens:
            entries.pop(0)
        copy = tensor.detach().clone() if tensor.device.type == "cpu" else None
        self.entries = [*entries, (weakref.ref(tensor, self._drop), tensor._version, extra, layout, tokens, copy)]
        return layout

    def tokens(self) -> int:
        """Tokens of the layouts held now (at most `max_tokens`)."""
        return sum(e[4] for e in self.entries)


_LAYOUTS = _LayoutCache()


def _layout_from_cu(cu_seq_lens: torch.Tensor, max_length, batch: int, seq: int) -> SequenceLayout:
    check_cu_seq_lens_type(cu_seq_lens)
    cached = _LAYOUTS.get(cu_seq_lens, (batch, seq))
    if cached is not None:
        return cached
    max_length = check_cu_seq_lens(cu_seq_lens, batch, seq, max_length)
    cu = cu_seq_lens.to(torch.int32, copy=True)  # never the source itself: the cache holds it only weakly
    full_rows = cu.numel() == batch + 1 and max_length == seq
    return _LAYOUTS.put(cu_seq_lens, (batch, seq), SequenceLayout(cu, max_length, None, full_rows), batch * seq)


def _layout_from_starts(starts: torch.Tensor, real: torch.Tensor | None) -> SequenceLayout:
    """Layout from `(B, S)` bool sequence starts and an optional `(B, S)` bool real-token mask."""
    batch, seq = starts.shape
    starts = starts.clone()
    starts[:, 0] = True
    token_index = None
    flat_starts = starts.reshape(-1)
    if real is not None and not bool(real.all()):
        flat_real = real.reshape(-1)
        token_index = torch.nonzero(flat_real).squeeze(1)
        # a real token starts a sequence where it starts one, or where the previous flat token is padding
        previous_pad = torch.cat([flat_real.new_ones(1), flat_real[:-1]]) == 0
        flat_starts = (flat_starts | previous_pad)[token_index]
    start_index = torch.nonzero(flat_starts).squeeze(1)
    total = flat_starts.numel()
    cu = torch.cat([start_index, start_index.new_tensor([total])]).to(torch.int32)
    lengths = torch.diff(cu)
    max_length = int(lengths.max())
    full_rows = token_index is None and cu.numel() == batch + 1 and max_length == seq
    return SequenceLayout(cu, max_length, token_index, full_rows)


def _layout_from_positions(position_ids: torch.Tensor, batch: int, seq: int) -> SequenceLayout:
    cached = _LAYOUTS.get(position_ids, (batch, seq))
    if cached is not None:
        return cached
    positions = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    starts = torch.ones(batch, seq, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return _LAYOUTS.put(position_ids, (batch, seq), _layout_from_starts(starts, None), batch * seq)


def _identity(tensor: torch.Tensor | None) -> tuple | None:
    """What makes a cached layout stale: the tensor's storage and version, and on CPU its content
    (edits through `.numpy()` / `.data` keep the version); None: not cacheable."""
    if tensor is None:
        return ()
    if tensor.is_inference():
        return None
    content = hash(tensor.detach().contiguous().numpy().tobytes()) if tensor.device.type == "cpu" else None
    return (tensor.data_ptr(), tensor._version, content)


def _layout_from_sequence_map(
    sequence_map: torch.Tensor,
    batch: int,
    seq: int,
    cu_seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> SequenceLayout:
    """Layout from this backend's mask: `(B, S)` int32, 0 on padding, a new id at every sequence start.

    With `cu_seq_lens` or `position_ids` `(B|1, S)` too, a sequence starts wherever any of them says
    so: the mask can be finer than the examples (chunked-attention layers, Llama 4), and the
    collator's boundaries are the examples (which the mask does not see when a cache exists, nor in
    a padded batch whose rows hold several packed examples).
    """
    extra = (batch, seq, _identity(cu_seq_lens), _identity(position_ids))
    cacheable = None not in extra
    cached = _LAYOUTS.get(sequence_map, extra) if cacheable else None
    if cached is not None:
        return cached
    starts = torch.ones(batch, seq, dtype=torch.bool, device=sequence_map.device)
    starts[:, 1:] = sequence_map[:, 1:] != sequence_map[:, :-1]
    if cu_seq_lens is not None:
        _layout_from_cu(cu_seq_lens, None, batch, seq)  # validates that it covers the batch
        starts.view(-1)[cu_seq_lens[:-1].long()] = True
    if position_ids is not None:
        starts[:, 1:] |= position_ids[:, 1:] != position_ids[:, :-1] + 1
    layout = _layout_from_starts(starts, sequence_map != 0)
    return _LAYOUTS.put(sequence_map, extra, layout, batch * seq) if cacheable else layout


def _chunk_size(module) -> int | None:
    """The chunk length of a chunked-attention layer (Llama 4: `attention_chunk_size` on the layers
    `layer_types` marks `"chunked_attention"`), else None."""
    config = getattr(module, "config", None)
    chunk = getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if chunk and types and isinstance(index, int) and index < len(types) and types[index] == "chunked_attention":
        return int(chunk)
    return None


def _chunked(layout: SequenceLayout, chunk: int) -> SequenceLayout:
    """Every sequence cut into chunks of `chunk` tokens from its own start (the last one shorter)."""
    lengths = torch.diff(layout.cu_seq_lens.long())
    pieces = torch.div(lengths + chunk - 1, chunk, rounding_mode="floor")
    starts = torch.repeat_interleave(layout.cu_seq_lens[:-1].long(), pieces)
    first = torch.repeat_interleave(torch.cumsum(pieces, 0) - pieces, pieces)
    starts = starts + chunk * (torch.arange(len(starts), device=starts.device) - first)
    cu = torch.cat([starts, layout.cu_seq_lens[-1:].long()]).to(torch.int32)
    return SequenceLayout(cu, min(layout.max_length, chunk), layout.token_index, False)


def _chunked_layout(module, query, key, kwargs: dict) -> SequenceLayout | None:
    """A chunked-attention layer's layout from the examples (`cu_seq_lens`, else `position_ids`), chunked
    from each example's start, or None (not a chunked layer, or no examples given: the mask decides).

    transformers' chunked mask counts chunks from each example's start only when it sees the packing
    (no cache, recent versions); otherwise its chunks run across the packed row."""
    chunk = _chunk_size(module)
    examples = resolve_layout(query, key, None, kwargs) if chunk else None
    if examples is None:
        return None
    source = kwargs.get("cu_seq_lens_q")
    source = source if source is not None else kwargs["position_ids"]
    extra = ("chunked", chunk, tuple(query.shape[:1] + query.shape[2:3]))
    cached = _LAYOUTS.get(source, extra)
    tokens = query.shape[0] * query.shape[2]
    return cached if cached is not None else _LAYOUTS.put(source, extra, _chunked(examples, chunk), tokens)


def _is_sequence_map(attention_mask) -> bool:
    """This backend's `(B, S)` int32 map, or a `(B, S)` padding mask given directly (the same rules
    read it: 0 is padding, a sequence starts wherever the value changes)."""
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2


def resolve_layout(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict) -> SequenceLayout | None:
    """The sequence layout of a call, or None for a decoding call (`S != S_kv`), which is dense."""
    batch, _, seq, _ = query.shape
    if key.shape[2] != seq:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        check_cu_seq_lens_type(cu)
    position_ids = checked_position_ids(kwargs.get("position_ids"), batch, seq)  # None: absent or multi-section
    if _is_sequence_map(attention_mask):
        check_padding_mask(attention_mask, batch, seq)
        return _layout_from_sequence_map(attention_mask, batch, seq, cu, position_ids)
    if cu is not None:
        return _layout_from_cu(cu, kwargs.get("max_length_q"), batch, seq)
    if position_ids is not None:
        return _layout_from_positions(position_ids, batch, seq)
    return None  # one sequence per row, no padding


# ---------------------------------------------------------------------------------------------
# The mask function registered with transformers
# ---------------------------------------------------------------------------------------------


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


def _flagged_layers_under_causal_mask(config, mask_function, batch: int, length: int, device) -> bool:
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


# set by recurrent.py: the width of the causal mask for a model whose attention is written inside it
# (the longest packed example), or None
internal_attention_mask_width = None


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
          (PaliGemma; see the module docstring, point 4): transformers' own mask too.
    """
    width = internal_attention_mask_width() if internal_attention_mask_width is not None else None
    if width is not None:
        # a model whose attention is written inside it adds the mask itself: eager's 4-D mask; for a
        # packed forward (recurrent.py runs its examples apart) a plain causal one, as wide as the
        # longest example, cut per bucket
        from transformers.masking_utils import causal_mask_function, eager_mask

        dense = {"dtype": kwargs.get("dtype", torch.float32), "device": kwargs.get("device", "cpu")}
        if width and q_length == kv_length and not (q_offset or kv_offset):
            return eager_mask(batch_size, width, width, mask_function=causal_mask_function, **dense)
        return eager_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                          attention_mask=attention_mask, **dense)
    device = attention_mask.device if attention_mask is not None else kwargs.get("device", "cpu")
    if (q_length != kv_length or q_offset or kv_offset
            or _flagged_layers_under_causal_mask(kwargs.get("config"), mask_function, batch_size, q_length, device)):
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


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Repeat key/value heads `groups` times along dimension `head_dim` (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim)


def _attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    opts: AttentionOptions,
    allowed: torch.Tensor | None,
    sinks: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    """Attention over batched, equal-length rows. q `(G, H, L, D)`, k/v `(G, H_kv, L_kv, D)` -> `(G, H, L, D_v)`.

    `allowed` is a bool mask broadcastable to `(G, H, L, L_kv)`, or an additive float mask (None:
    all, or causal when `is_causal`). SDPA when it can; softcap or sinks need the logits, so they
    go the eager way.
    """
    groups = q.shape[1] // k.shape[1]
    if opts.softcap is None and sinks is None:
        k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=opts.dropout, is_causal=is_causal and allowed is None,
            scale=opts.scaling,
        )
    k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
    scale = opts.scaling if opts.scaling is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if opts.softcap is not None:
        logits = torch.tanh(logits / opts.softcap) * opts.softcap
    if is_causal and allowed is None:
        length, length_kv = logits.shape[-2:]
        allowed = torch.ones(length, length_kv, dtype=torch.bool, device=q.device).tril(length_kv - length)
    if allowed is not None and allowed.dtype == torch.bool:
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    elif allowed is not None:
        logits = logits + allowed
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(logits.shape[0], -1, logits.shape[-2], 1).to(logits.dtype)
        logits = torch.cat([logits, sink], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, p=opts.dropout, training=opts.dropout > 0)
    return torch.matmul(probs, v)


def _window_mask(length: int, window: int | None, causal: bool, device) -> torch.Tensor | None:
    """`(L, L)` bool allowed-mask for a sliding window (and causality), or None when not needed."""
    if window is None or window >= length:
        return None
    idx = torch.arange(length, device=device)
    distance = idx[:, None] - idx[None, :]
    allowed = distance < window
    if causal:
        allowed &= distance >= 0
    else:
        allowed &= distance > -window
    return allowed


def same_block(blocks: torch.Tensor) -> torch.Tensor:
    """`(G, L, L)` bool: query and key carry the same block id >= 0; `blocks` `(G, L)`."""
    return (blocks[:, :, None] == blocks[:, None, :]) & (blocks >= 0)[:, :, None]


def block_allowed(blocks: torch.Tensor, window: int | None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """`(G, 1, L, L)` bool allowed-mask of causal rows `(G, L)` with bidirectional blocks.

    A query sees the earlier keys and every key of its own block (`blocks` >= 0, the same id), within
    `window` keys back when given (`window & (causal | same block)`, Gemma 3's rule);
    `lengths` `(G,)`: keys at or after a row's length are padding and never seen.
    """
    width = blocks.shape[-1]
    index = torch.arange(width, device=blocks.device)
    distance = index[:, None] - index[None, :]
    allowed = same_block(blocks) | (distance >= 0)
    if window is not None:
        allowed = allowed & (distance < window)
    if lengths is not None:
        allowed = allowed & (index[None, :] < lengths[:, None])[:, None, :]
    return allowed[:, None]


def _plan_buckets(lengths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group sequences of similar length; per bucket: `(G, L)` gather index and `(G,)` lengths.

    Sequences are taken longest first; a bucket closes when the next sequence is shorter than
    `BUCKET_RATIO` of the bucket's longest and the padding would cost more than `BUCKET_MIN_PAIRS`.
    Inside a bucket each sequence is right-padded by repeating its own last token index.
    """
    lengths_np = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths_np)[:-1]])
    order = np.argsort(-lengths_np, kind="stable")
    buckets, current = [], [int(order[0])]
    for index in order[1:].tolist():  # one step per sequence, not per token
        longest = int(lengths_np[current[0]])
        length = int(lengths_np[index])
        if length < BUCKET_RATIO * longest and longest**2 - length**2 > BUCKET_MIN_PAIRS:
            buckets.append(current)
            current = []
        current.append(index)
    buckets.append(current)
    plans = []
    for members in buckets:
        members = np.asarray(members)
        width = int(lengths_np[members[0]])
        offsets = np.minimum(np.arange(width)[None, :], lengths_np[members, None] - 1)
        plans.append((starts[members, None] + offsets, lengths_np[members]))
    return plans


def _scatter_plan(layout: SequenceLayout, device):
    """Buckets `[(gather (G*L,), lengths (G,), G, L)]` on `device`, and the `(M,)` index that puts
    the buckets' outputs back in token order. Computed once per layout."""
    if layout._buckets is None:
        plans = _plan_buckets(layout.lengths())
        back = np.empty(int(sum(layout.lengths())), dtype=np.int64)
        buckets, offset = [], 0
        for gather, seq_lengths in plans:
            count, width = gather.shape
            valid = np.arange(width)[None, :] < seq_lengths[:, None]
            back[gather[valid]] = offset + np.flatnonzero(valid.reshape(-1))
            offset += count * width
            buckets.append(
                (torch.from_numpy(gather.reshape(-1)).to(device), torch.from_numpy(seq_lengths).to(device), count, width)
            )
        layout._buckets = (buckets, torch.from_numpy(back).to(device))
    return layout._buckets


def exact_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SequenceLayout,
    opts: AttentionOptions,
    sinks: torch.Tensor | None = None,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention per sequence. q `(M, H, D)`, k/v `(M, H_kv, D)` in token order -> `(M, H, D_v)`.

    Sequences are grouped into buckets of similar length and right-padded inside a bucket (the
    padding is masked: causally when causal, by key padding otherwise), so each bucket is one
    batched attention call. `blocks` `(M,)`: bidirectional block ids of causal layers (see
    `block_allowed`), or None.
    """
    buckets, back = _scatter_plan(layout, q.device)
    outputs = []
    for gather, seq_lengths, count, width in buckets:
        qb = q.index_select(0, gather).view(count, width, *q.shape[1:]).transpose(1, 2)
        kb = k.index_select(0, gather).view(count, width, *k.shape[1:]).transpose(1, 2)
        vb = v.index_select(0, gather).view(count, width, *v.shape[1:]).transpose(1, 2)
        is_causal = opts.causal
        if blocks is not None and opts.causal:
            allowed = block_allowed(blocks.index_select(0, gather).view(count, width), opts.sliding_window, seq_lengths)
            is_causal = False  # the mask holds causality
        else:
            allowed = _window_mask(width, opts.sliding_window, opts.causal, q.device)
        if not opts.causal:
            key_real = torch.arange(width, device=q.device)[None, :] < seq_lengths[:, None]
            key_real = key_real[:, None, None, :]
            allowed = key_real if allowed is None else allowed & key_real
        out = _attention_dense(qb, kb, vb, opts, allowed, sinks, is_causal=is_causal)
        outputs.append(out.transpose(1, 2).reshape(count * width, *out.shape[1:2], out.shape[-1]))
    return torch.cat(outputs).index_select(0, back)


def _flash_attn_varlen_func():
    """flash-attn's varlen function, or None when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return flash_attn_varlen_func


def _torch_varlen_attn():
    """PyTorch's `varlen_attn`, or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def flash_varlen(q, k, v, layout: SequenceLayout, opts: AttentionOptions, fn=None) -> torch.Tensor:
    """flash-attn's varlen kernel. q `(M, H, D)`, k/v `(M, H_kv, D)` -> `(M, H, D)`."""
    fn = fn or _flash_attn_varlen_func()
    kwargs = {"dropout_p": opts.dropout, "softmax_scale": opts.scaling, "causal": opts.causal}
    if opts.sliding_window is not None and layout.max_length > opts.sliding_window:
        kwargs["window_size"] = (opts.sliding_window - 1, 0 if opts.causal else opts.sliding_window - 1)
    if opts.softcap is not None:
        kwargs["softcap"] = opts.softcap
    cu = layout.cu_seq_lens
    return fn(q, k, v, cu, cu, layout.max_length, layout.max_length, **kwargs)


def torch_varlen(q, k, v, layout: SequenceLayout, opts: AttentionOptions, fn=None) -> torch.Tensor:
    """PyTorch's varlen kernel, adapting to its signature. q `(M, H, D)`, k/v `(M, H_kv, D)` -> `(M, H, D)`."""
    fn = fn or _torch_varlen_attn()
    params = _parameters(fn)
    kwargs = {"scale": opts.scaling}
    if "window_size" in params:  # torch >= 2.13: causality is a window
        left = opts.sliding_window - 1 if opts.sliding_window is not None and layout.max_length > opts.sliding_window else -1
        kwargs["window_size"] = (left, 0 if opts.causal else left)  # -1: unbounded on that side
    else:  # older releases: is_causal, no window
        kwargs["is_causal"] = opts.causal
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
    cu = layout.cu_seq_lens
    return fn(q, k, v, cu, cu, layout.max_length, layout.max_length, **kwargs)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

_DECISIONS: dict[tuple, tuple[str, str]] = {}


def choose_kernel(device_type: str, dtype: torch.dtype, opts: AttentionOptions, head_dims_match: bool) -> tuple[str, str]:
    """(kernel name, reason) for a call site; see the module docstring for the order."""
    if device_type != "cuda":
        return EXACT, f"no varlen kernel on {device_type}"
    if opts.bidirectional_blocks:
        return EXACT, f"bidirectional blocks ({BLOCK_IDS}): no varlen kernel takes them"
    half = dtype in (torch.float16, torch.bfloat16)
    flash = _flash_attn_varlen_func()
    if flash is not None:
        missing = []
        if not half:
            missing.append(f"dtype {dtype} (flash-attn takes fp16/bf16)")
        if opts.has_sinks:
            missing.append("attention sinks (s_aux)")
        if opts.softcap is not None and "softcap" not in _parameters(flash):
            missing.append("softcap (flash-attn < 2.6)")
        if not head_dims_match:
            missing.append("different query and value head sizes")
        if not missing:
            return FLASH_VARLEN, "CUDA and flash-attn installed"
        reason = "flash-attn lacks " + ", ".join(missing)
    else:
        reason = "flash-attn not installed"
    varlen = _torch_varlen_attn()
    if varlen is None:
        return EXACT, reason + "; this torch has no varlen_attn"
    missing = []
    if not half:
        missing.append(f"dtype {dtype} (varlen_attn takes fp16/bf16)")
    if opts.softcap is not None:
        missing.append("softcap")
    if opts.has_sinks:
        missing.append("attention sinks (s_aux)")
    if opts.dropout > 0:
        missing.append("dropout")
    if opts.sliding_window is not None and "window_size" not in _parameters(varlen):
        missing.append("sliding window (this torch's varlen_attn has no window_size)")
    if not head_dims_match:
        missing.append("different query and value head sizes")
    if missing:
        return EXACT, reason + "; varlen_attn lacks " + ", ".join(missing)
    return TORCH_VARLEN, reason + "; using PyTorch's varlen_attn"


def _decide(device_type: str, dtype: torch.dtype, opts: AttentionOptions, head_dims_match: bool, site: str) -> str:
    key = (site, device_type, dtype, opts.causal, opts.sliding_window is not None, opts.softcap is not None,
           opts.has_sinks, opts.dropout > 0, head_dims_match, opts.bidirectional_blocks)
    if key not in _DECISIONS:
        kernel, reason = choose_kernel(device_type, dtype, opts, head_dims_match)
        _DECISIONS[key] = (kernel, reason)
        if device_type == "cuda" and kernel == EXACT:
            logger.warning("packcollate attention in %s falls back to the exact path: %s", site, reason)
        else:
            logger.info("packcollate attention in %s uses %s: %s", site, kernel, reason)
    return _DECISIONS[key][0]


def describe() -> str:
    """What the backend can use here, and which kernel each call site has chosen so far."""
    flash = _flash_attn_varlen_func()
    varlen = _torch_varlen_attn()
    lines = [
        f"packcollate attention backend (registered as {BACKEND_NAME!r})",
        f"  torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
        f"  flash-attn: {'installed' if flash is not None else 'not installed'}",
        "  torch varlen_attn: "
        + ("absent" if varlen is None else "window_size API" if "window_size" in _parameters(varlen) else "is_causal API"),
        f"  exact path: scaled_dot_product_attention over length buckets (ratio {BUCKET_RATIO})",
    ]
    if _DECISIONS:
        lines.append("  call sites so far:")
        for key, (kernel, reason) in _DECISIONS.items():
            site, device_type, dtype = key[:3]
            lines.append(f"    {site} [{device_type}, {str(dtype).replace('torch.', '')}]: {kernel} ({reason})")
    else:
        lines.append("  no call yet")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The attention function registered with transformers
# ---------------------------------------------------------------------------------------------

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)


def _decode_attention(query, key, value, opts: AttentionOptions, sinks) -> torch.Tensor:
    """Dense attention when queries are the last `S` of `S_kv` keys and no mask came with them (a
    model that builds none; with a cache, `packcollate_mask` hands transformers' 4-D mask instead)."""
    length, length_kv = query.shape[2], key.shape[2]
    idx_q = torch.arange(length, device=query.device)[:, None] + (length_kv - length)
    idx_k = torch.arange(length_kv, device=query.device)[None, :]
    allowed = idx_k <= idx_q if opts.causal else torch.ones_like(idx_k, dtype=torch.bool).expand(length, -1)
    if opts.sliding_window is not None:
        allowed = allowed & (idx_q - idx_k < opts.sliding_window)
    return _attention_dense(query, key, value, opts, allowed[None, None], sinks, is_causal=False)


#: Keyword arguments some models hand their attention function that change its logits (T5's and
#: Inkling's relative `position_bias`, Inkling's per-token `sinks`, ALiBi): refused, never ignored.
LOGIT_TERMS = ("position_bias", "sinks", "alibi", "attention_bias")


def packcollate_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers' `AttentionInterface`: q `(B, H, S, D)`, k/v `(B, H_kv, S_kv, D)` -> `(B, S, H, D_v)`.

    Sequences are kept apart as described in the module docstring. Returns no attention weights.
    """
    if kwargs.get("output_attentions"):
        _warn_once("weights", "packcollate attention returns no attention weights (output_attentions is ignored)")
    refused = [name for name in LOGIT_TERMS if isinstance(kwargs.get(name), torch.Tensor)]
    if refused:
        raise ValueError(
            f"attn_implementation='packcollate': {type(module).__name__} passes {', '.join(map(repr, refused))}, a term "
            f"on the attention logits this backend does not apply (ignoring it would change the model's output); "
            f"train this architecture with padding and its own attention backend"
        )
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    batch, heads, seq, _ = query.shape
    # blocks shape a causal prefill/training call only (decoding gets transformers' 4-D mask)
    blocks = checked_block_ids(kwargs.get(BLOCK_IDS), batch, seq) if causal and key.shape[2] == seq else None
    opts = AttentionOptions(
        causal=causal,
        scaling=scaling,
        dropout=float(dropout) if module.training else 0.0,
        sliding_window=int(sliding_window) if sliding_window else None,
        softcap=float(softcap) if softcap else None,
        has_sinks=s_aux is not None,
        bidirectional_blocks=blocks is not None,
    )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        # a mask the caller built (create_causal_mask passes 4-D masks through untouched), or ours with a
        # cache: honour it; a query with no key left (padding) attends everywhere, so it stays finite
        mask = attention_mask[..., : key.shape[2]]
        if mask.dtype == torch.bool:
            mask = mask | ~mask.any(-1, keepdim=True)
        out = _attention_dense(query, key, value, opts, mask, s_aux, is_causal=False)
        return out.transpose(1, 2).contiguous(), None
    if key.shape[2] == seq and torch.compiler.is_compiling():  # one graph, no sync: see compiled_attention.py
        from .traced import traceable_attention

        return traceable_attention(module, query, key, value, attention_mask, opts, s_aux, kwargs, blocks).contiguous(), None
    layout = _chunked_layout(module, query, key, kwargs) or resolve_layout(query, key, attention_mask, kwargs)
    if layout is None and key.shape[2] != seq:
        out = _decode_attention(query, key, value, opts, s_aux)
        return out.transpose(1, 2).contiguous(), None
    if layout is None or layout.full_rows:
        if query.device.type != "cuda" or batch == 1:
            # every row is one sequence: batched attention, no gather
            if blocks is not None:  # the mask holds causality
                allowed, is_causal = block_allowed(blocks, opts.sliding_window), False
            else:
                allowed, is_causal = _window_mask(seq, opts.sliding_window, opts.causal, query.device), opts.causal
            out = _attention_dense(query, key, value, opts, allowed, s_aux, is_causal=is_causal)
            return out.transpose(1, 2).contiguous(), None
        if layout is None:
            cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device)
            layout = SequenceLayout(cu, seq, None, True)

    site = type(module).__name__
    kernel = _decide(query.device.type, query.dtype, opts, query.shape[-1] == value.shape[-1], site)
    # (B, H, S, D) -> (B * S, H, D) tokens; keep the real ones
    q = query.transpose(1, 2).reshape(batch * seq, heads, query.shape[-1])
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], key.shape[-1])
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], value.shape[-1])
    if layout.token_index is not None:
        q, k, v = q.index_select(0, layout.token_index), k.index_select(0, layout.token_index), v.index_select(0, layout.token_index)
    if kernel == FLASH_VARLEN:
        out = flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), layout, opts)
    elif kernel == TORCH_VARLEN:
        out = torch_varlen(q.contiguous(), k.contiguous(), v.contiguous(), layout, opts)
    else:
        token_blocks = None
        if blocks is not None:
            token_blocks = blocks.reshape(-1).long()
            token_blocks = token_blocks if layout.token_index is None else token_blocks.index_select(0, layout.token_index)
        out = exact_varlen(q, k, v, layout, opts, s_aux, token_blocks)
    if layout.token_index is not None:
        full = out.new_zeros(batch * seq, *out.shape[1:])
        out = full.index_copy(0, layout.token_index, out)
    return out.view(batch, seq, heads, out.shape[-1]), None


def _falcon_attention_class():
    """Falcon writes its attention inside the model (no `AttentionInterface`) and builds its mask
    without `position_ids`, so no backend choice keeps packed examples apart there. This subclass of
    `FalconAttention` computes the same projections and rotary embeddings, then calls
    `packcollate_attention` with the `position_ids` Falcon's decoder hands it. ALiBi configs are refused."""
    from transformers.models.falcon import modeling_falcon as falcon

    class PackcollateFalconAttention(falcon.FalconAttention):
        def forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
                    output_attentions=False, position_embeddings=None, **kwargs):
            if alibi is not None:
                raise ValueError(
                    "attn_implementation='packcollate': expected a Falcon config with rotary positions, got alibi=True "
                    "(ALiBi biases are not supported by the packcollate backend)"
                )
            batch, length = hidden_states.shape[:2]
            kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
            query, key, value = self._split_heads(self.query_key_value(hidden_states))  # (B, S, heads, D)
            query = query.transpose(1, 2).reshape(batch, self.num_heads, length, self.head_dim)
            key = key.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
            value = value.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
            cos, sin = position_embeddings
            query, key = falcon.apply_rotary_pos_emb(query, key, cos, sin)
            if layer_past is not None:
                key, value = layer_past.update(key, value, self.layer_idx)
            # as Falcon's own eager/sdpa paths: scale head_dim ** -0.5, no attention dropout
            out, _ = packcollate_attention(self, query, key, value, attention_mask, scaling=self.head_dim**-0.5,
                                           position_ids=position_ids, **kwargs)
            return self.dense(out.reshape(batch, length, self.num_heads * self.head_dim)), None

    return falcon.FALCON_ATTENTION_CLASSES, PackcollateFalconAttention


def register() -> None:
    """Register the backend and its mask with transformers (done on `import packcollate`), and the
    Falcon attention class that routes Falcon through it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(BACKEND_NAME, packcollate_attention)
    AttentionMaskInterface.register(BACKEND_NAME, packcollate_mask)
    try:
        classes, falcon_class = _falcon_attention_class()
    except (ImportError, AttributeError):  # a transformers without Falcon, or with a different layout
        return
    classes.setdefault(BACKEND_NAME, falcon_class)
