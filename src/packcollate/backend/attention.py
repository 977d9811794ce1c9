"""The `packcollate` attention backend for transformers: padding-free attention on any hardware.

After `import packcollate`, `attn_implementation="packcollate"` works in `from_pretrained`,
`from_config` and `model.set_attn_implementation` (`register()`). The backend keeps packed examples
apart whatever the model or cache does:

1. The sequence layout comes from the `cu_seq_lens_q/_k` and `max_length_q/_k` kwargs the
   collator emits, and from the mask this backend registers with transformers'
   `AttentionMaskInterface` (`mask.py`: it reaches every layer as `attention_mask`, even in models
   whose layers drop kwargs; it carries padding of normal batches and the chunks of
   chunked-attention layers); a sequence starts wherever either says so. Without both, from
   `position_ids` (a new sequence wherever the position does not continue); otherwise each row of
   the batch is one sequence (`layout.layout_of_call`). It never depends on `use_cache`.
2. The kernel is chosen once per call site (device, dtype, features) and reported by `describe()`:
   CUDA + `flash_attn` -> `flash_attn_varlen_func`; CUDA + `torch.nn.attention.varlen.varlen_attn`
   -> PyTorch's own varlen kernel; otherwise exact per-sequence attention (`kernels.exact_varlen`).
   A feature a fast kernel lacks (softcap, attention sinks, dropout, fp32, …) falls back to the
   exact path with a one-time warning naming why.
3. Bidirectional blocks: `bidirectional_block_ids` `(B|1, S)` (the vision collator emits it for
   families whose image tokens attend to each other in both directions, Gemma 3) lets tokens of one
   block id (>= 0) in one sequence see each other, future ones included; everything else stays
   causal, and a sliding window still bounds how far back a query looks (Gemma 3's rule:
   `window & (causal | same block)`). Only the exact path takes them (on CUDA too, with a warning).
   Blocks shape causal calls only: a layer whose `is_causal` is False, or a caller passing
   `is_causal=False`, attends both ways and ignores them.
4. Under `torch.compile`, the traced path (`traced.py`): the same semantics as one graph.

Shapes (transformers' convention): `query` `(B, H, S, D)`, `key`/`value` `(B, H_kv, S_kv, D)`; the
output is `(B, S, H, D_v)`. Packed batches have `B = 1`, `S = N`.
"""

from __future__ import annotations

import logging

import torch

from ..errors import LayoutError, UnsupportedError
from ..layout import (
    BACKEND_NAME,
    BLOCK_IDS,
    SequenceLayout,
    checked_block_ids,
    layout_of_call,
    traced_sequence_ids,
)
from . import state
from .kernels import (
    EXACT,
    FLASH_VARLEN,
    TORCH_VARLEN,
    AttentionOptions,
    LogitTerms,
    block_allowed,
    choose_kernel,
    dense_attention,
    exact_varlen,
    find_flash_varlen,
    find_torch_varlen,
    flash_varlen,
    parameters_of,
    torch_varlen,
    window_mask,
)
from .mask import packcollate_mask
from .patches import is_prepared, pools_into_patches
from .sequence_parallel import shard_of_call, ulysses_attention
from .traced import chunk_size, traceable_attention

logger = logging.getLogger("packcollate")


def _same_example(batch: int, seq: int, device, kwargs: dict) -> torch.Tensor | None:
    """`(B, 1, S, S)` bool: query and key in the same example, as `cu_seq_lens_q` / `position_ids` say when
    they describe this call's `(B, S)` tokens (a vision tower's own patch positions do not); None when
    neither does. A 4-D mask built by transformers keeps packed examples apart only in some releases
    (5.17's block overlay for PaliGemma's prefix reaches across them): this keeps them apart in every
    release. Tensor operations only (it runs under `torch.compile` too)."""
    cu = kwargs.get("cu_seq_lens_q")
    positions = kwargs.get("position_ids")
    ours = {}
    if isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() >= 2:
        if torch.compiler.is_compiling() or int(cu[-1]) == batch * seq:
            ours["cu_seq_lens_q"] = cu
    if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[-1] == seq \
            and positions.shape[0] in (1, batch):
        ours["position_ids"] = positions
    if not ours:
        return None
    if not torch.compiler.is_compiling():
        layout_of_call(batch, seq, None, ours)  # what they say is checked first (and cached)
    ids, _ = traced_sequence_ids(batch, seq, device, None, ours, None)
    return (ids[:, :, None] == ids[:, None, :])[:, None]


def _chunked_layout(module, query, key, kwargs: dict) -> SequenceLayout | None:
    """A chunked-attention layer's layout from the examples (`cu_seq_lens`, else `position_ids`, else the prepared
    model's call in progress), chunked from each example's start, or None (not a chunked layer, or no examples
    given: the mask decides).

    transformers' chunked mask counts chunks from each example's start only when it sees the packing
    (no cache, recent versions); otherwise its chunks run across the packed row."""
    chunk = chunk_size(module)
    batch, seq = query.shape[0], query.shape[2]
    if not chunk or key.shape[2] != seq:
        return None
    examples = layout_of_call(batch, seq, None, kwargs) or state.called_layout(batch, seq)
    if examples is None:
        return None
    return examples.derived(("chunked", chunk), lambda: examples.chunked(chunk))


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

# call site and features -> (kernel, reason): decided once, reported by `describe()`
_DECISIONS: dict[tuple, tuple[str, str]] = {}


def decide(device_type: str, dtype: torch.dtype, opts: AttentionOptions, head_dims_match: bool, site: str) -> str:
    """The kernel of a call site (`kernels.choose_kernel`), decided once and logged once."""
    key = (site, device_type, dtype, opts.causal, opts.sliding_window is not None, opts.softcap is not None,
           opts.has_sinks, opts.dropout > 0, head_dims_match, opts.bidirectional_blocks, opts.has_bias)
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
    flash = find_flash_varlen()
    varlen = find_torch_varlen()
    lines = [
        f"packcollate attention backend (registered as {BACKEND_NAME!r})",
        f"  torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
        f"  flash-attn: {'installed' if flash is not None else 'not installed'}",
        "  torch varlen_attn: "
        + ("absent" if varlen is None else "window_size API" if "window_size" in parameters_of(varlen) else "is_causal API"),
        "  exact path: scaled_dot_product_attention over length buckets",
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


def _decode_attention(query, key, value, opts: AttentionOptions, sinks, bias=None) -> torch.Tensor:
    """Dense attention when queries are the last `S` of `S_kv` keys and no mask came with them (a
    model that builds none; with a cache, `packcollate_mask` hands transformers' 4-D mask instead)."""
    length, length_kv = query.shape[2], key.shape[2]
    idx_q = torch.arange(length, device=query.device)[:, None] + (length_kv - length)
    idx_k = torch.arange(length_kv, device=query.device)[None, :]
    allowed = idx_k <= idx_q if opts.causal else torch.ones_like(idx_k, dtype=torch.bool).expand(length, -1)
    if opts.sliding_window is not None:
        allowed = allowed & (idx_q - idx_k < opts.sliding_window)
    return dense_attention(query, key, value, opts, allowed[None, None], sinks, is_causal=False, bias=bias)


#: Keyword arguments some models hand their attention function that change its logits, and that the
#: backend does not apply: refused, never ignored (ALiBi, MiniMax-M3's block-sparse `block_indices`;
#: T5-style `position_bias` and Inkling's per-token `sinks` are applied, see `_logit_terms`).
LOGIT_TERMS = ("alibi", "attention_bias", "block_indices")
#: The keyword argument of a sparse-attention indexer's selection (DeepSeek-V3.2 and its kin hand their
#: top-k key indices `(B, S, k)` to every backend but eager/sdpa): applied on the dense path.
SPARSE_INDICES = "indices"


def _selected_keys(module, indices, batch: int, seq: int, kv_length: int) -> torch.Tensor:
    """`(B, 1, S, S_kv)` bool: the keys a sparse-attention indexer selected for each query, from its top-k
    key indices `(B, S, k)` (what eager/sdpa fold into the mask as `~index_mask`)."""
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, seq) or indices.dtype.is_floating_point:
        raise UnsupportedError(
            f"attn_implementation='packcollate': {type(module).__name__} passes {SPARSE_INDICES!r} of shape "
            f"{tuple(indices.shape)} ({indices.dtype}), expected top-k key indices ({batch}, {seq}, k) (integers); "
            f"train this architecture with padding and its own attention backend"
        )
    indices = indices.long()
    indices = indices.masked_fill((indices < 0) | (indices >= kv_length), kv_length)  # -1: no key (a spare column)
    selected = torch.zeros(batch, seq, kv_length + 1, dtype=torch.bool, device=indices.device)
    return selected.scatter(-1, indices, True)[:, None, :, :kv_length]


def _logit_terms(module, query, key, s_aux, kwargs: dict) -> LogitTerms:
    """The logit terms of a call: `position_bias` `(B|1, H|1, S, S_kv)` and per-token `sinks` `(B|1, H, S, 1)`
    (Inkling, Inkling 2), or GPT-OSS's per-head `s_aux` `(H,)`; one line naming what does not fit."""
    bias, sinks = kwargs.get("position_bias"), kwargs.get("sinks")
    bias = bias if isinstance(bias, torch.Tensor) else None
    sinks = sinks if isinstance(sinks, torch.Tensor) else None
    batch, heads, seq = query.shape[:3]
    name = type(module).__name__
    if bias is not None and (bias.dim() != 4 or bias.shape[0] not in (1, batch) or bias.shape[1] not in (1, heads)
                             or tuple(bias.shape[2:]) != (seq, key.shape[2])):
        raise UnsupportedError(
            f"attn_implementation='packcollate': {name} passes position_bias of shape {tuple(bias.shape)}, expected "
            f"(B|1, H|1, S, S_kv) = ({batch}|1, {heads}|1, {seq}, {key.shape[2]}); train it with padding"
        )
    if sinks is not None and (s_aux is not None or sinks.dim() != 4 or sinks.shape[0] not in (1, batch)
                              or tuple(sinks.shape[1:]) != (heads, seq, 1)):
        raise UnsupportedError(
            f"attn_implementation='packcollate': {name} passes sinks of shape {tuple(sinks.shape)}"
            f"{' besides s_aux' if s_aux is not None else ''}, expected per-token sinks (B|1, H, S, 1) = "
            f"({batch}|1, {heads}, {seq}, 1); train it with padding"
        )
    return LogitTerms(bias, sinks if sinks is not None else s_aux)


def _refuse_patching_models(module, batch: int, layout: SequenceLayout | None) -> None:
    """Refuse a packed call (more sequences than rows) of a layer of a model that pools tokens into patches
    and that `prepare` did not give its per-example patches (`patches.py`): its patches and its patch
    transformer would span the packed row."""
    if layout is None or layout.full_rows or is_prepared(module) or not pools_into_patches(getattr(module, "config", None)):
        return
    if len(layout.lengths()) > batch:
        raise UnsupportedError(
            f"attn_implementation='packcollate': {type(module).__name__} belongs to a model that pools its tokens into "
            f"patches and was not prepared (entropy patching starts patches only at the row's first two bytes, so one "
            f"patch can hold bytes of two examples; its global transformer numbers and attends the whole row's "
            f"patches): call packcollate.prepare(model), which gives each packed example its own patches"
        )


def _refuse_decoder_not_causal(module, causal: bool, seq: int, length_kv: int, attention_mask) -> None:
    """Refuse a decoder's attention over its own tokens that says `is_causal=False` (`module.is_decoder`) and
    comes with no 4-D mask: it relies on transformers' 4-D causal mask (BigBird-Pegasus's decoder
    self-attention), which this backend replaces by the sequence map, so every token would attend to the later
    tokens of its example (transformers' flash backends read the same flag)."""
    if causal or getattr(module, "is_decoder", False) is not True or length_kv != seq or seq < 2:
        return
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        return  # transformers' own mask (with a cache): honoured as it is
    raise UnsupportedError(
        f"attn_implementation='packcollate': {type(module).__name__} is a decoder's attention over its own tokens "
        f"that says is_causal=False and relies on a 4-D causal mask this backend does not build, so its tokens would "
        f"attend to later tokens; train this architecture with padding and attn_implementation='sdpa' or 'eager'"
    )


def _check_length_of_layout(module, batch: int, seq: int, length_kv: int, kwargs: dict) -> None:
    """Refuse, naming the layer, a call whose `cu_seq_lens_q` describes another number of tokens than it
    attends over: a batch cut or padded after collation, or a layer the model runs over a sequence it derived
    from the tokens without that sequence's example boundaries (BLT's global transformer over byte patches,
    whose entropy patching groups bytes of neighbouring examples into one patch)."""
    cu = kwargs.get("cu_seq_lens_q")
    if not (isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() >= 2 and length_kv == seq):
        return
    total = int(cu[-1])
    if total != batch * seq:
        raise LayoutError(
            f"attn_implementation='packcollate': {type(module).__name__}: cu_seq_lens_q: expected it to end at the "
            f"batch's {batch * seq} tokens ({batch} x {seq}), got {total}: the batch was cut or padded after collation, "
            f"or the model runs this layer over a sequence it derived from the tokens (BLT's byte patches) without "
            f"that sequence's example boundaries, so its examples cannot be kept apart; train it with padding "
            f"(PaddedCollator)"
        )


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
    Inside a sequence-parallel forward (`sequence_parallel.shard_scope`) the call holds this rank's
    shard of one packed row: it attends over the whole row (`sequence_parallel.ulysses_attention`).
    """
    options = {"dropout": dropout, "scaling": scaling, "sliding_window": sliding_window, "softcap": softcap}
    shard = shard_of_call()
    if shard is not None:
        out = ulysses_attention(_attention, module, query, key, value, attention_mask, shard, s_aux, {**options, **kwargs})
        return out, None
    return _attention(module, query, key, value, attention_mask, s_aux=s_aux, **options, **kwargs)


def _attention(
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
    """`packcollate_attention` over whole rows (every call outside a sequence-parallel forward)."""
    if kwargs.get("output_attentions"):
        _warn_once("weights", "packcollate attention returns no attention weights (output_attentions is ignored)")
    refused = [name for name in LOGIT_TERMS if isinstance(kwargs.get(name), torch.Tensor)]
    if refused:
        raise UnsupportedError(
            f"attn_implementation='packcollate': {type(module).__name__} passes {', '.join(map(repr, refused))}, a term "
            f"on the attention logits this backend does not apply (ignoring it would change the model's output); "
            f"train this architecture with padding and its own attention backend"
        )
    terms = _logit_terms(module, query, key, s_aux, kwargs)
    s_aux = terms.sinks
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    batch, heads, seq, _ = query.shape
    _refuse_decoder_not_causal(module, causal, seq, key.shape[2], attention_mask)
    indices = kwargs.get(SPARSE_INDICES)
    selected = (_selected_keys(module, indices, batch, seq, key.shape[2]) if isinstance(indices, torch.Tensor)
                else None)
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
        has_bias=terms.bias is not None,
    )
    if selected is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4):
        # an indexer's selection without a 4-D mask: exact only where each row is one sequence
        layout = layout_of_call(batch, seq, attention_mask, kwargs) if key.shape[2] == seq else None
        if key.shape[2] != seq or attention_mask is not None or not (layout is None or layout.full_rows):
            raise UnsupportedError(
                f"attn_implementation='packcollate': {type(module).__name__} passes {SPARSE_INDICES!r} (an indexer's "
                f"top-k keys) without the 4-D mask it selected them under, so they may lie in another packed example; "
                f"call packcollate.prepare(model) (its attention layers then run each example apart)"
            )
        allowed = window_mask(seq, opts.sliding_window, opts.causal, query.device)
        if allowed is None:
            allowed = torch.ones(seq, seq, dtype=torch.bool, device=query.device)
            allowed = allowed.tril() if opts.causal else allowed
        attention_mask = allowed.expand(batch, 1, seq, seq)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        # a mask the caller built (create_causal_mask passes 4-D masks through untouched), or transformers'
        # own (with a cache; layers flagged bidirectional), or the one example's mask of a layer that runs
        # per bucket: honour it, inside the examples the kwargs name, on the keys an indexer selected; a
        # query with no key left (padding) attends everywhere, so it stays finite
        if attention_mask.shape[-2] not in (1, seq) or 1 < attention_mask.shape[-1] < key.shape[2]:
            raise UnsupportedError(
                f"attn_implementation='packcollate': {type(module).__name__} hands a mask of shape "
                f"{tuple(attention_mask.shape)} to attention over {seq} queries and {key.shape[2]} keys (a mask made "
                f"for other tokens: one example's, or the packed row's); train this architecture with padding"
            )
        mask = attention_mask[..., : key.shape[2]]
        same = _same_example(batch, seq, query.device, kwargs) if key.shape[2] == seq else None
        if selected is not None:
            same = selected if same is None else same & selected
        if same is not None:
            mask = mask & same if mask.dtype == torch.bool else mask.masked_fill(~same, torch.finfo(mask.dtype).min)
        if mask.dtype == torch.bool:
            mask = mask | ~mask.any(-1, keepdim=True)
        out = dense_attention(query, key, value, opts, mask, s_aux, is_causal=False, bias=terms.bias)
        return out.transpose(1, 2).contiguous(), None
    if key.shape[2] == seq and torch.compiler.is_compiling():  # one graph, no sync: see traced.py
        if terms.bias is not None or (s_aux is not None and s_aux.dim() == 4):
            raise UnsupportedError(
                f"attn_implementation='packcollate': {type(module).__name__} passes position_bias or per-token sinks, "
                f"which the traced path (torch.compile) does not apply; train it without torch.compile"
            )
        return traceable_attention(module, query, key, value, attention_mask, opts, s_aux, kwargs, blocks).contiguous(), None
    _check_length_of_layout(module, batch, seq, key.shape[2], kwargs)
    layout = _chunked_layout(module, query, key, kwargs) or (layout_of_call(batch, seq, attention_mask, kwargs) if key.shape[2] == seq else None)
    _refuse_patching_models(module, batch, layout)
    if layout is None and key.shape[2] != seq:
        out = _decode_attention(query, key, value, opts, s_aux, terms.bias)
        return out.transpose(1, 2).contiguous(), None
    if layout is None or layout.full_rows:
        if query.device.type != "cuda" or batch == 1:
            # every row is one sequence: batched attention, no gather
            if blocks is not None:  # the mask holds causality
                allowed, is_causal = block_allowed(blocks, opts.sliding_window), False
            else:
                allowed, is_causal = window_mask(seq, opts.sliding_window, opts.causal, query.device), opts.causal
            out = dense_attention(query, key, value, opts, allowed, s_aux, is_causal=is_causal, bias=terms.bias)
            return out.transpose(1, 2).contiguous(), None
        if layout is None:
            cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device)
            layout = SequenceLayout(cu, seq, None, True)

    site = type(module).__name__
    kernel = decide(query.device.type, query.dtype, opts, query.shape[-1] == value.shape[-1], site)
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
        per_token = terms.bias is not None or (s_aux is not None and s_aux.dim() == 4)
        out = exact_varlen(q, k, v, layout, opts, s_aux, token_blocks, terms if per_token else None, seq)
    if layout.token_index is not None:
        full = out.new_zeros(batch * seq, *out.shape[1:])
        out = full.index_copy(0, layout.token_index, out)
    return out.view(batch, seq, heads, out.shape[-1]), None


def register() -> None:
    """Register the backend and its mask function with transformers (done on `import packcollate`):
    `attn_implementation="packcollate"` then works in `from_pretrained`, `from_config` and
    `set_attn_implementation`. Nothing else is changed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(BACKEND_NAME, packcollate_attention)
    AttentionMaskInterface.register(BACKEND_NAME, packcollate_mask)
