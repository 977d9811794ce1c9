"""The attention kernels of the packcollate backend, over packed tokens `(M, H, D)` in token order.

- `exact_varlen`: exact attention per sequence on any device, the sequences grouped into length
  buckets (`buckets.bucket_plan`), each bucket one `scaled_dot_product_attention` call (or the eager
  formula when softcapping or sinks need the logits);
- `flash_varlen`: flash-attn's `flash_attn_varlen_func`; `torch_varlen`: PyTorch's own
  `torch.nn.attention.varlen.varlen_attn`, adapting to its signature (`window_size` in torch >= 2.13,
  `is_causal` before) and repeating grouped-query K/V heads where it takes no `enable_gqa`;
- `choose_kernel`: which of the three a call site uses (device, dtype, features), and why;
- `dense_attention`, `window_mask`, `block_allowed`: attention over batched equal-length rows, shared
  by the exact path, the traced path and the decode path.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layout import BLOCK_IDS, SequenceLayout
from .buckets import ATTENTION_COST, bucket_plan

EXACT = "exact-sdpa"
TORCH_VARLEN = "torch-varlen"
FLASH_VARLEN = "flash-attn-varlen"


@dataclass(frozen=True)
class AttentionOptions:
    """What one attention call asks for.

    Attributes:
        causal: queries see only earlier keys of their sequence.
        scaling: softmax scale (default `D ** -0.5`).
        dropout: attention dropout probability (0 outside training).
        sliding_window: a query sees at most this many keys, itself included (`q - kv < W`), or None.
        softcap: logits become `softcap * tanh(logits / softcap)` (Gemma 2), or None.
        has_sinks: sink logits join the softmax: per head (`s_aux`, GPT-OSS) or per token (Inkling 2's `sinks`).
        bidirectional_blocks: tokens of one `bidirectional_block_ids` block see each other.
        has_bias: a term is added to the logits of every query/key pair (Inkling's relative `position_bias`).
    """

    causal: bool = True
    scaling: float | None = None
    dropout: float = 0.0
    sliding_window: int | None = None
    softcap: float | None = None
    has_sinks: bool = False
    bidirectional_blocks: bool = False
    has_bias: bool = False


@dataclass(frozen=True)
class LogitTerms:
    """Terms a model adds to the attention logits of one call over its `(B, S)` tokens (keys: the same
    tokens); each None when absent.

    Attributes:
        bias: `(B|1, H|1, S, S)` added to the logits of every query/key pair (Inkling's relative
            `position_bias`); pairs of different examples are masked anyway.
        sinks: `(B|1, H, S, 1)` one sink logit per query token (Inkling 2's `sinks`), or `(H,)` one per head
            (GPT-OSS's `s_aux`): joins the softmax with a zero value.
    """

    bias: torch.Tensor | None = None
    sinks: torch.Tensor | None = None

    def for_tokens(self, rows: torch.Tensor, seq: int) -> LogitTerms:
        """The terms of buckets of tokens: `rows` `(G, L)` flat indices into the call's `B * S` tokens, each
        row one sequence (of one batch row) -> bias `(G, H|1, L, L)`, per-token sinks `(G, H, L, 1)`."""
        batch, position = rows // seq, rows % seq
        bias, sinks = None, self.sinks
        if self.bias is not None:
            row = batch if self.bias.shape[0] > 1 else torch.zeros_like(batch)
            bias = self.bias[row[:, :, None], :, position[:, :, None], position[:, None, :]].permute(0, 3, 1, 2)
        if self.sinks is not None and self.sinks.dim() == 4:
            row = batch if self.sinks.shape[0] > 1 else torch.zeros_like(batch)
            sinks = self.sinks[row, :, position, 0].permute(0, 2, 1).unsqueeze(-1)
        return LogitTerms(bias, sinks)


def repeat_kv(x: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Repeat key/value heads `groups` times along dimension `head_dim` (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    opts: AttentionOptions,
    allowed: torch.Tensor | None,
    sinks: torch.Tensor | None,
    is_causal: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over batched, equal-length rows. q `(G, H, L, D)`, k/v `(G, H_kv, L_kv, D)` -> `(G, H, L, D_v)`.

    `allowed` is a bool mask broadcastable to `(G, H, L, L_kv)`, or an additive float mask (None:
    all, or causal when `is_causal`). `sinks`: per-head `(H,)` or per-query `(G|1, H, L, 1)` sink
    logits; `bias`: a term added to the logits, broadcastable to `(G, H, L, L_kv)` (`LogitTerms`).
    SDPA when it can; softcap, sinks or a bias need the logits, so they go the eager way.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups, 1), repeat_kv(v, groups, 1)
    if opts.softcap is None and sinks is None and bias is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=opts.dropout, is_causal=is_causal and allowed is None,
            scale=opts.scaling,
        )
    scale = opts.scaling if opts.scaling is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if opts.softcap is not None:
        logits = torch.tanh(logits / opts.softcap) * opts.softcap
    if bias is not None:
        logits = logits + bias
    if is_causal and allowed is None:
        length, length_kv = logits.shape[-2:]
        allowed = torch.ones(length, length_kv, dtype=torch.bool, device=q.device).tril(length_kv - length)
    if allowed is not None and allowed.dtype == torch.bool:
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    elif allowed is not None:
        logits = logits + allowed
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1) if sinks.dim() == 1 else sinks
        sink = sink.expand(logits.shape[0], logits.shape[1], logits.shape[-2], 1).to(logits.dtype)
        logits = torch.cat([logits, sink], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, p=opts.dropout, training=opts.dropout > 0)
    return torch.matmul(probs, v)


def window_mask(length: int, window: int | None, causal: bool, device) -> torch.Tensor | None:
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


def exact_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SequenceLayout,
    opts: AttentionOptions,
    sinks: torch.Tensor | None = None,
    blocks: torch.Tensor | None = None,
    terms: LogitTerms | None = None,
    seq: int | None = None,
) -> torch.Tensor:
    """Exact attention per sequence. q `(M, H, D)`, k/v `(M, H_kv, D)` in token order -> `(M, H, D_v)`.

    Sequences are grouped into buckets of similar length and right-padded inside a bucket (the
    padding is masked: causally when causal, by key padding otherwise), so each bucket is one
    batched attention call. `blocks` `(M,)`: bidirectional block ids of causal layers (see
    `block_allowed`), or None. `terms`: logit terms over the call's `(B, S)` tokens, `seq = S`
    (`layout.token_index` maps the `M` tokens to them), cut to each bucket's sequences.
    """
    plan = bucket_plan(layout, q.device, ATTENTION_COST)
    outputs = []
    for bucket in plan.buckets:
        gather, seq_lengths, count, width = bucket.gather, bucket.lengths, bucket.count, bucket.width
        bias, bucket_sinks = None, sinks
        if terms is not None:
            rows = gather if layout.token_index is None else layout.token_index.index_select(0, gather)
            cut = terms.for_tokens(rows.view(count, width), seq)
            bias, bucket_sinks = cut.bias, cut.sinks
        qb = q.index_select(0, gather).view(count, width, *q.shape[1:]).transpose(1, 2)
        kb = k.index_select(0, gather).view(count, width, *k.shape[1:]).transpose(1, 2)
        vb = v.index_select(0, gather).view(count, width, *v.shape[1:]).transpose(1, 2)
        is_causal = opts.causal
        if blocks is not None and opts.causal:
            allowed = block_allowed(blocks.index_select(0, gather).view(count, width), opts.sliding_window, seq_lengths)
            is_causal = False  # the mask holds causality
        else:
            allowed = window_mask(width, opts.sliding_window, opts.causal, q.device)
        if not opts.causal:
            key_real = torch.arange(width, device=q.device)[None, :] < seq_lengths[:, None]
            key_real = key_real[:, None, None, :]
            allowed = key_real if allowed is None else allowed & key_real
        out = dense_attention(qb, kb, vb, opts, allowed, bucket_sinks, is_causal=is_causal, bias=bias)
        outputs.append(out.transpose(1, 2).reshape(count * width, *out.shape[1:2], out.shape[-1]))
    return torch.cat(outputs).index_select(0, plan.back)


def find_flash_varlen():
    """flash-attn's varlen function, or None when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return flash_attn_varlen_func


def find_torch_varlen():
    """PyTorch's `varlen_attn`, or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def parameters_of(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def flash_varlen(q, k, v, layout: SequenceLayout, opts: AttentionOptions, fn=None) -> torch.Tensor:
    """flash-attn's varlen kernel. q `(M, H, D)`, k/v `(M, H_kv, D)` -> `(M, H, D)`."""
    fn = fn or find_flash_varlen()
    kwargs = {"dropout_p": opts.dropout, "softmax_scale": opts.scaling, "causal": opts.causal}
    if opts.sliding_window is not None and layout.max_length > opts.sliding_window:
        kwargs["window_size"] = (opts.sliding_window - 1, 0 if opts.causal else opts.sliding_window - 1)
    if opts.softcap is not None:
        kwargs["softcap"] = opts.softcap
    cu = layout.cu_seq_lens
    return fn(q, k, v, cu, cu, layout.max_length, layout.max_length, **kwargs)


def torch_varlen(q, k, v, layout: SequenceLayout, opts: AttentionOptions, fn=None) -> torch.Tensor:
    """PyTorch's varlen kernel, adapting to its signature. q `(M, H, D)`, k/v `(M, H_kv, D)` -> `(M, H, D)`."""
    fn = fn or find_torch_varlen()
    params = parameters_of(fn)
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
            k, v = repeat_kv(k, groups, 1), repeat_kv(v, groups, 1)
    cu = layout.cu_seq_lens
    return fn(q, k, v, cu, cu, layout.max_length, layout.max_length, **kwargs)


def choose_kernel(device_type: str, dtype: torch.dtype, opts: AttentionOptions, head_dims_match: bool) -> tuple[str, str]:
    """(kernel name, reason) for a call site; see the module docstring for the order."""
    if device_type != "cuda":
        return EXACT, f"no varlen kernel on {device_type}"
    if opts.bidirectional_blocks:
        return EXACT, f"bidirectional blocks ({BLOCK_IDS}): no varlen kernel takes them"
    if opts.has_bias:
        return EXACT, "a term on the attention logits (position_bias): no varlen kernel takes one"
    half = dtype in (torch.float16, torch.bfloat16)
    flash = find_flash_varlen()
    if flash is not None:
        missing = []
        if not half:
            missing.append(f"dtype {dtype} (flash-attn takes fp16/bf16)")
        if opts.has_sinks:
            missing.append("attention sinks (s_aux)")
        if opts.softcap is not None and "softcap" not in parameters_of(flash):
            missing.append("softcap (flash-attn < 2.6)")
        if not head_dims_match:
            missing.append("different query and value head sizes")
        if not missing:
            return FLASH_VARLEN, "CUDA and flash-attn installed"
        reason = "flash-attn lacks " + ", ".join(missing)
    else:
        reason = "flash-attn not installed"
    varlen = find_torch_varlen()
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
    if opts.sliding_window is not None and "window_size" not in parameters_of(varlen):
        missing.append("sliding window (this torch's varlen_attn has no window_size)")
    if not head_dims_match:
        missing.append("different query and value head sizes")
    if missing:
        return EXACT, reason + "; varlen_attn lacks " + ", ".join(missing)
    return TORCH_VARLEN, reason + "; using PyTorch's varlen_attn"
