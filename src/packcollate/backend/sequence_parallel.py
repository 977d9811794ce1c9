"""Ulysses sequence parallelism for the packcollate backend: one packed row split across a process group.

Each of the `P` ranks of a sequence-parallel group holds a contiguous shard of the row's `N` tokens
(`n_r` of them, `sum(n_r) = N`; shards may differ in length by one). Everything but attention is
per token and runs on the shard. Attention needs every token of an example, so each attention call
(`ulysses_attention`):

1. exchanges its query, key and value with one `all_to_all_single` each: from `(n_r tokens, all H
   heads)` to `(all N tokens, H / P heads)` (rank `j` gets heads `j*H/P … (j+1)*H/P - 1`);
2. runs the packcollate kernel on those heads over the row's global `cu_seq_lens` (the examples of
   the whole row, one of them possibly cut by a shard edge: it is whole again here);
3. exchanges the output back to `(n_r tokens, all H heads)`.

Both exchanges are differentiable (their backward is the reverse exchange). Grouped-query K/V: with
`H_kv` divisible by `P`, each rank gets `H_kv / P` K/V heads (those its query heads read); with `P`
divisible by `H_kv`, every K/V head is repeated `P / H_kv` times first so each rank gets the one its
query heads read; otherwise refused. The exchanges are `torch.distributed` collectives on the group
the shard names (gloo on CPU, NCCL on GPU): no communication layer of our own.

The shard of the call in progress travels with the call on a context variable (`shard_scope`),
never in a process global: the attention function reads it (`current_shard`), and a checkpointed
layer recomputed during backward re-enters the shard of the forward that ran it
(`keep_shard_when_recomputed`).
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UnsupportedError
from ..layout import BLOCK_IDS


@dataclass(frozen=True)
class SequenceShard:
    """This rank's share of one packed row in a sequence-parallel group.

    Attributes:
        group: the sequence-parallel process group (None: the default group).
        rank, size: this rank's index in `group`, and the group's size `P`.
        bounds: `(P+1,)` token offsets of the shards: rank `r` holds tokens `bounds[r] … bounds[r+1]-1`.
        cu_seq_lens: `(k+1,)` int32, the examples of the whole row (`[0, l_0, …, N]`).
        max_length: the longest example of the row.
    """

    group: object
    rank: int
    size: int
    bounds: tuple[int, ...]
    cu_seq_lens: torch.Tensor
    max_length: int

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def local_length(self) -> int:
        return self.stop - self.start

    @property
    def total_length(self) -> int:
        return self.bounds[-1]

    @property
    def lengths(self) -> list[int]:
        """Tokens of every rank's shard."""
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]


_SHARD: ContextVar[tuple[SequenceShard | None, ...]] = ContextVar("packcollate_sequence_shard", default=())


def current_shard() -> SequenceShard | None:
    """The shard of the sequence-parallel forward in progress on this thread, or None."""
    stack = _SHARD.get()
    return stack[-1] if stack else None


#: How many shard scopes are open in this process. Read only under `torch.compile`, which cannot trace the
#: context variable: a sequence-parallel forward is refused there rather than traced unsplit.
_OPEN_SCOPES = [0]
_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def shard_scope(shard: SequenceShard | None):
    """Run the block with `shard` as the call's shard (None: a forward that is not sequence-parallel)."""
    token = _SHARD.set((*_SHARD.get(), shard))
    with _OPEN_LOCK:
        _OPEN_SCOPES[0] += 1
    try:
        yield shard
    finally:
        with _OPEN_LOCK:
            _OPEN_SCOPES[0] -= 1
        _SHARD.reset(token)


def shard_of_call() -> SequenceShard | None:
    """The shard an attention call runs in (`current_shard`); under `torch.compile` None, or
    `UnsupportedError` while a sequence-parallel forward is open (it would be traced unsplit)."""
    if not torch.compiler.is_compiling():
        return current_shard()
    if _OPEN_SCOPES[0]:
        raise UnsupportedError("sequence parallelism: torch.compile does not trace the split attention; "
                               "run the sequence-parallel model uncompiled")
    return None


class _InShard:
    """A checkpointed unit's checkpoint function, wrapped: what it checkpoints runs inside the shard of the
    forward that called it, then and when backward recomputes it."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def __call__(self, function, *args, **kwargs):
        shard = current_shard()

        def run(*inner_args, **inner_kwargs):
            with shard_scope(shard):
                return function(*inner_args, **inner_kwargs)

        return self.checkpoint(run, *args, **kwargs)


def keep_shard_when_recomputed(model: torch.nn.Module) -> None:
    """Wrap the checkpoint function of every checkpointed unit of `model` (transformers'
    `_gradient_checkpointing_func`) so a recomputed attention call sees its forward's shard; call it
    before each forward (`gradient_checkpointing_enable` sets a new function)."""
    for unit in model.modules():
        checkpoint = unit.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None and not isinstance(checkpoint, _InShard):
            unit._gradient_checkpointing_func = _InShard(checkpoint)


# ---------------------------------------------------------------------------------------------
# The exchanges
# ---------------------------------------------------------------------------------------------


def _exchange(x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    """`all_to_all_single` along dim 0: rows `send[j]` go to rank `j`, rows `receive[j]` come from it."""
    out = x.new_empty((sum(receive), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


class _TokensToHeads(torch.autograd.Function):
    """`(n_r, H, D)` this rank's tokens, all heads -> `(N, H/P, D)` all tokens, this rank's heads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
        ctx.shard = shard
        return _tokens_to_heads(x, shard)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _heads_to_tokens(grad, ctx.shard), None


class _HeadsToTokens(torch.autograd.Function):
    """`(N, H/P, D)` all tokens, this rank's heads -> `(n_r, H, D)` this rank's tokens, all heads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
        ctx.shard = shard
        return _heads_to_tokens(x, shard)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _tokens_to_heads(grad, ctx.shard), None


def _tokens_to_heads(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    n, heads, dim = x.shape
    per_rank = heads // shard.size
    # (n_r, P, H/P, D) -> (P, n_r, H/P, D): the block for rank j holds its heads of our tokens
    blocks = x.reshape(n, shard.size, per_rank, dim).transpose(0, 1).reshape(shard.size * n, per_rank, dim)
    return _exchange(blocks, [n] * shard.size, shard.lengths, shard.group)  # tokens in rank order: the row


def _heads_to_tokens(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    _, per_rank, dim = x.shape
    n = shard.local_length
    blocks = _exchange(x, shard.lengths, [n] * shard.size, shard.group)  # (P * n_r, H/P, D), block j: rank j's heads
    return blocks.reshape(shard.size, n, per_rank, dim).transpose(0, 1).reshape(n, shard.size * per_rank, dim)


def tokens_to_heads(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """Differentiable: `(n_r, H, D)` -> `(N, H/P, D)` over `shard.group` (`H` divisible by `P`)."""
    return _TokensToHeads.apply(x, shard)


def heads_to_tokens(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """Differentiable: `(N, H/P, D)` -> `(n_r, H, D)` over `shard.group`; `tokens_to_heads`'s inverse."""
    return _HeadsToTokens.apply(x, shard)


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


def kv_repeats(heads: int, kv_heads: int, size: int, where: str = "") -> int:
    """How often each K/V head is repeated before the exchange so that every rank gets the K/V heads its
    `heads / size` query heads read: 1 when `size` divides `kv_heads`, `size / kv_heads` when `kv_heads`
    divides `size`. Raises `UnsupportedError` otherwise, or when `size` does not divide `heads`."""
    if heads % size:
        raise UnsupportedError(
            f"sequence parallelism{where}: {heads} attention heads do not split over a group of {size} ranks "
            f"(each rank attends with heads / ranks of them); use a group size that divides {heads}"
        )
    if kv_heads % size == 0:
        return 1
    if size % kv_heads == 0 and heads % kv_heads == 0:
        return size // kv_heads
    raise UnsupportedError(
        f"sequence parallelism{where}: {kv_heads} key/value heads neither split over a group of {size} ranks nor "
        f"divide it; use a group size that {kv_heads} divides or that divides {kv_heads}"
    )


def ulysses_attention(attend, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, shard: SequenceShard, s_aux: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
    """One attention call of a sequence-parallel forward: q `(1, H, n_r, D)`, k/v `(1, H_kv, n_r, D)` ->
    `(1, n_r, H, D_v)` (see the module docstring).

    `attend(module, q, k, v, attention_mask, s_aux=, **kwargs)` is the packcollate attention over whole
    rows; it gets this rank's heads of all `N` tokens, the row's `cu_seq_lens_q/_k` and `max_length_q/_k`,
    no mask, and `s_aux` (per-head sinks) cut to this rank's heads. Refused (`UnsupportedError`): a batch
    of several rows, a call not over the shard's tokens (a cache, a vision tower), a 4-D mask, and
    bidirectional blocks.
    """
    name = type(module).__name__
    batch, heads, length, _ = query.shape
    if batch != 1 or length != shard.local_length or key.shape[2] != length:
        raise UnsupportedError(
            f"sequence parallelism: {name} attends {batch} row(s) of {length} queries over {key.shape[2]} keys; "
            f"expected one packed row's shard of {shard.local_length} tokens (no cache, no other tower)"
        )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        raise UnsupportedError(
            f"sequence parallelism: {name} got a 4-D attention mask (the model builds its own mask); only masks the "
            f"packcollate backend derives from the row's examples split across ranks"
        )
    if kwargs.get(BLOCK_IDS) is not None:
        raise UnsupportedError(f"sequence parallelism: {name} got {BLOCK_IDS!r} (bidirectional image blocks): not split across ranks")
    repeats = kv_repeats(heads, key.shape[1], shard.size, f" ({name})")
    if repeats > 1:
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    per_rank = heads // shard.size
    q, k, v = (tokens_to_heads(x[0].transpose(0, 1), shard).transpose(0, 1)[None] for x in (query, key, value))
    if s_aux is not None:
        s_aux = s_aux[shard.rank * per_rank:(shard.rank + 1) * per_rank]
    cu = shard.cu_seq_lens.to(query.device)
    layout = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": shard.max_length, "max_length_k": shard.max_length}
    passed = {key_: value_ for key_, value_ in kwargs.items() if key_ not in ("position_ids", *layout)}
    out, _ = attend(module, q, k, v, None, s_aux=s_aux, **passed, **layout)  # (1, N, H/P, D_v)
    return heads_to_tokens(out[0], shard)[None]
