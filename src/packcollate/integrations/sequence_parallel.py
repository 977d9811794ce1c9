"""Sequence parallelism over packed rows in hand-written loops: one row split across a process group, exact.

A packed row too long for one device's activations is split across the `P` ranks of a
sequence-parallel group (`torch.distributed`, gloo on CPU or NCCL on GPU); attention exchanges heads
for tokens (Ulysses, `packcollate.backend.sequence_parallel`) and sees the whole row, so every
example, also one cut by a shard edge, attends exactly as in one process:

    group = None                                   # the default group; or dist.new_group(ranks)
    model = prepare_sequence_parallel(model, group)    # refuses models it cannot split, before any step
    for batch in loader:                           # every rank of the group gets the same packed row
        shard = shard_packed_batch(batch, group)   # this rank's tokens, labels shifted first
        logits = sequence_parallel_forward(model, shard).logits      # (1, n_r, V)
        loss = sequence_parallel_loss(logits, shard)                  # this rank's share
        (loss * dist.get_world_size()).backward()  # DDP averages gradients over the ranks
        optimizer.step(); optimizer.zero_grad()

- The split balances tokens: rank `r` gets tokens `floor(r N / P) … floor((r+1) N / P) - 1`; a row
  whose length `P` does not divide is fine (shards differ by one token).
- Labels are shifted over the whole row before it is split (`shift_labels`: the next token of the
  same example, -100 at every example's last token), so no target crosses a shard edge.
- The loss: each rank's share is its targets' summed cross-entropy over the targets of the whole
  row (`loss_weighting="token"`, all-reduced over the group), or each example's summed loss on this
  rank over that example's targets on all ranks, over the examples (`"sequence"`); the shares of the
  group add up to the row's loss, and `num_items_in_batch` (`count_shard_targets`) extends that to
  gradient accumulation and data-parallel groups exactly as `packcollate.integrations.loops` does.
  Each rank's backward yields part of the gradient (the exchanges send the rest to the ranks that
  computed it): their sum over the group is the row's gradient, hence the multiplication by the
  number of ranks DDP averages over.
- Refused before the first step, in one line (`UnsupportedError`): layers that carry state along the
  sequence (recurrent, convolution: hybrid models) or compute attention inside the model (they would
  see one shard only), a model not on the packcollate backend, head counts the group does not split.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import torch
import torch.distributed as dist

from ..backend import restart
from ..backend.patches import is_patching_model
from ..backend.sequence_parallel import (
    SequenceShard,
    keep_shard_when_recomputed,
    kv_repeats,
    shard_scope,
)
from ..collate.text import PackedCollator
from ..errors import InputError, LayoutError, MissingKeyError, UnsupportedError
from ..layout import BACKEND_NAME, FLASH_KWARGS, IGNORE_INDEX, example_index, example_positions
from ..unwrap import unwrap_model

#: The key of a shard batch that holds its `SequenceShard` (not a model input).
SHARD_KEY = "sequence_shard"
#: Keys of a packed batch that `shard_packed_batch` reads; any other key is refused.
SHARDED_KEYS = ("input_ids", "labels", "position_ids", "seq_idx", *FLASH_KWARGS)


def _group_size(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise UnsupportedError("sequence parallelism: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first (torchrun sets the environment)")
    return dist.get_rank(group), dist.get_world_size(group)


def whole_row_layers(model: torch.nn.Module) -> list[str]:
    """Class names of the layers of `model` that must see each packed example whole, in one call: token mixers,
    attention computed inside the model or run per example (mask readers, layers numbering their tokens
    themselves), positional embeddings numbering the row, and models pooling tokens into patches (BLT). Split
    across ranks, each would see one shard only."""
    layers = [*restart.token_mixers(model), *restart.internal_attention_layers(model),
              *restart.per_bucket_attention_layers(model), *restart.row_position_embeddings(model)]
    return sorted({type(layer).__name__ for _, layer in layers}
                  | {type(module).__name__ for module in model.modules() if is_patching_model(module)})


def prepare_sequence_parallel(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Check that `model` (bare or wrapped) can run split across `group` and mark it; returns `model`.

    Raises `UnsupportedError` (one line) for layers that carry state along the sequence or compute
    attention inside the model, for a model not on `attn_implementation="packcollate"`, and for head
    counts the group does not split (`backend.sequence_parallel.kv_repeats`)."""
    _, size = _group_size(group)
    inner = unwrap_model(model)
    name = type(inner).__name__
    stateful = whole_row_layers(model)
    if stateful:
        raise UnsupportedError(
            f"sequence parallelism: {name} has layers that carry state along the sequence or must see each packed "
            f"example whole ({', '.join(stateful)}); split across ranks each would see one shard only: train it unsplit"
        )
    config = inner.config
    backend = getattr(config, "_attn_implementation", None)
    if backend != BACKEND_NAME:
        raise UnsupportedError(
            f"sequence parallelism: {name} runs attn_implementation={backend!r}; expected {BACKEND_NAME!r} "
            f"(build it with attn_implementation={BACKEND_NAME!r})"
        )
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    if heads is not None:
        kv_repeats(heads, getattr(text, "num_key_value_heads", None) or heads, size, f" ({name})")
    inner.__dict__["_packcollate_sequence_group"] = (group, size)
    return model


def shard_bounds(total: int, size: int) -> tuple[int, ...]:
    """`(size+1,)` token offsets splitting `total` tokens into `size` contiguous shards of balanced length."""
    return tuple((rank * total) // size for rank in range(size + 1))


def shifted_labels(labels: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """`(1, N)` the label each token predicts: the next token's label in the same example, -100 at every
    example's last token (never the first token of the next example)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    ends = cu_seq_lens[1:].long() - 1
    shifted[:, ends] = IGNORE_INDEX
    return shifted


def shard_packed_batch(batch: dict, group=None) -> dict:
    """This rank's shard of a packed row (`PackedCollator`'s keys; every rank of `group` passes the same row).

    Args:
        batch: `input_ids` `(1, N)`, `cu_seq_lens_q` `(k+1,)`, optional `labels` `(1, N)`,
            `position_ids` `(1, N)` (or `(s, 1, N)`; default: restarting at every example),
            `cu_seq_lens_k`, `max_length_q/_k`, `seq_idx`.
    Returns a new dict (the batch is not changed): `input_ids` and `position_ids` `(1, n_r)` (the model's
    inputs), `shift_labels` `(1, n_r)` when `labels` were given, and `SHARD_KEY`: the `SequenceShard`
    (the group, the shards' offsets, the row's `cu_seq_lens` and longest example).
    Raises `MissingKeyError` / `LayoutError` / `InputError` for a batch that is not one packed row of at
    least `P` tokens, or that holds keys this split does not know."""
    rank, size = _group_size(group)
    for key in ("input_ids", "cu_seq_lens_q"):
        if key not in batch:
            raise MissingKeyError(f"shard_packed_batch: expected a packed batch with {key!r}, got keys {sorted(batch)}")
    unknown = sorted(set(batch) - set(SHARDED_KEYS))
    if unknown:
        raise InputError(f"shard_packed_batch: keys {unknown} are not split across ranks; expected only {list(SHARDED_KEYS)}")
    input_ids = torch.as_tensor(batch["input_ids"])
    cu = torch.as_tensor(batch["cu_seq_lens_q"]).to(torch.int32)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise LayoutError(f"shard_packed_batch: input_ids: expected one packed row (1, N), got shape {tuple(input_ids.shape)}")
    total = input_ids.shape[1]
    lengths = cu[1:] - cu[:-1]
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths <= 0).any()):
        raise LayoutError(f"shard_packed_batch: cu_seq_lens_q: expected increasing offsets [0, …, {total}], got {cu.tolist()}")
    if total < size:
        raise InputError(f"shard_packed_batch: a row of {total} tokens does not split over {size} ranks; expected at least {size}")
    bounds = shard_bounds(total, size)
    start, stop = bounds[rank], bounds[rank + 1]
    positions = batch.get("position_ids")
    if positions is None:
        positions = example_positions(cu, total)[None]
    positions = torch.as_tensor(positions)
    if positions.shape[-1] != total:
        raise LayoutError(f"shard_packed_batch: position_ids: expected {total} positions, got shape {tuple(positions.shape)}")
    shard = SequenceShard(group, rank, size, bounds, cu, int(lengths.max()))
    out = {"input_ids": input_ids[:, start:stop], "position_ids": positions[..., start:stop], SHARD_KEY: shard}
    if "labels" in batch:
        labels = torch.as_tensor(batch["labels"])
        if tuple(labels.shape) != tuple(input_ids.shape):
            raise LayoutError(f"shard_packed_batch: labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        out["shift_labels"] = shifted_labels(labels, cu)[:, start:stop]
    return out


def _shard_of(shard_batch: dict) -> SequenceShard:
    shard = shard_batch.get(SHARD_KEY)
    if not isinstance(shard, SequenceShard):
        raise MissingKeyError(f"expected a batch from shard_packed_batch (with {SHARD_KEY!r}), got keys {sorted(shard_batch)}")
    return shard


def sequence_parallel_forward(model: torch.nn.Module, shard_batch: dict, **kwargs):
    """`model(input_ids=, position_ids=, **kwargs)` on this rank's shard, its attention over the whole row.

    `model` (bare or wrapped: DDP, PEFT, …) must have been through `prepare_sequence_parallel` with the
    shard's group; gradient checkpointing recomputes inside the same shard. Returns the model's output
    (logits `(1, n_r, V)`); compute the loss with `sequence_parallel_loss`."""
    shard = _shard_of(shard_batch)
    inner = unwrap_model(model)
    marked = inner.__dict__.get("_packcollate_sequence_group")
    if marked is None or marked[0] is not shard.group:
        raise UnsupportedError(
            f"sequence parallelism: {type(inner).__name__} was not prepared for this group; call "
            f"prepare_sequence_parallel(model, group) with the group given to shard_packed_batch"
        )
    keep_shard_when_recomputed(model)
    with shard_scope(shard):
        return model(input_ids=shard_batch["input_ids"], position_ids=shard_batch["position_ids"], **kwargs)


def _token_losses(logits: torch.Tensor, shift_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(n_r,)` float32 cross-entropy (0 where not a target) and `(n_r,)` bool targets."""
    flat = shift_labels.reshape(-1).to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.reshape(flat.shape[0], -1).float(), flat,
                                            ignore_index=IGNORE_INDEX, reduction="none")
    return nll, flat != IGNORE_INDEX


def _per_example(shard: SequenceShard, values: torch.Tensor) -> torch.Tensor:
    """`(k,)` sums of this rank's per-token `values` `(n_r,)` over the row's examples."""
    ids = example_index(shard.cu_seq_lens.to(values.device))[shard.start:shard.stop]
    return values.new_zeros(shard.cu_seq_lens.numel() - 1).index_add(0, ids, values)


def _row_example_targets(shard: SequenceShard, targets: torch.Tensor) -> torch.Tensor:
    """`(k,)` targets of every example of the row, over all ranks of the group."""
    counts = _per_example(shard, targets.long())
    dist.all_reduce(counts, group=shard.group)
    return counts


LOSS_WEIGHTINGS = ("token", "sequence")


def _check_weighting(loss_weighting: str) -> None:
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise InputError(f"loss_weighting: expected one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")


def sequence_parallel_loss(logits: torch.Tensor, shard_batch: dict, *, loss_weighting: str = "token",
                           num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """This rank's share of the next-token loss of the row (see the module docstring); 0-d float32.

    Args:
        logits: `(1, n_r, V)` the model's logits on this rank's shard.
        shard_batch: from `shard_packed_batch` (with `shift_labels`).
        loss_weighting: `"token"`: every target weighs the same; `"sequence"`: every example does
            (`packcollate.objectives.losses`).
        num_items_in_batch: targets (`"token"`) or examples with targets (`"sequence"`) of the whole
            optimizer step, every row counted once (`count_shard_targets`); default: this row's.
    The shares of the group's ranks add up to the loss (summed over micro-batches and data-parallel
    groups too when `num_items_in_batch` counts them)."""
    _check_weighting(loss_weighting)
    shard = _shard_of(shard_batch)
    if "shift_labels" not in shard_batch:
        raise MissingKeyError("sequence_parallel_loss: the shard has no 'shift_labels'; give shard_packed_batch a batch with 'labels'")
    nll, targets = _token_losses(logits, shard_batch["shift_labels"])
    if loss_weighting == "token":
        if num_items_in_batch is None:
            num_items_in_batch = targets.sum()
            dist.all_reduce(num_items_in_batch, group=shard.group)
        return nll.sum() / torch.as_tensor(num_items_in_batch, device=nll.device).clamp(min=1).to(nll.dtype)
    per_example = _row_example_targets(shard, targets)
    if num_items_in_batch is None:
        num_items_in_batch = (per_example > 0).sum()
    sums = _per_example(shard, nll)
    return (sums / per_example.clamp(min=1).to(sums.dtype)).sum() / torch.as_tensor(
        num_items_in_batch, device=nll.device).clamp(min=1).to(nll.dtype)


def count_shard_targets(shard_batches, *, loss_weighting: str = "token", group=None) -> torch.Tensor:
    """The `num_items_in_batch` of an optimizer step of shards: targets (`"token"`) or examples with
    targets (`"sequence"`) of all its rows, each row counted once, summed over the micro-batches
    `shard_batches` and over every rank of `group` (default: the world; every sequence-parallel group
    in it of the same size). A 0-d int64 tensor."""
    _check_weighting(loss_weighting)
    total, size = None, 1
    for shard_batch in shard_batches:
        shard = _shard_of(shard_batch)
        size = shard.size
        targets = shard_batch["shift_labels"].reshape(-1) != IGNORE_INDEX
        count = targets.sum() if loss_weighting == "token" else (_row_example_targets(shard, targets) > 0).sum()
        total = count if total is None else total + count
    if total is None:
        raise InputError("count_shard_targets: expected at least one shard, got none")
    dist.all_reduce(total, group=group)
    return total if loss_weighting == "token" else total // size


# ---------------------------------------------------------------------------------------------
# PackedTrainer / PackedSFTTrainer: DeepSpeed's Ulysses (ALST) through accelerate's ParallelismConfig
# ---------------------------------------------------------------------------------------------


@functools.cache
def ulysses_loss_on_every_rank() -> bool:
    """Whether transformers' DeepSpeed Ulysses loss (`deepspeed_sp_compute_loss`) gathers the group's shard
    losses differentiably, so every rank backpropagates the whole row's loss (transformers up to 5.24): with
    DeepSpeed summing the group's gradients, a step then applies `sp_size` times the gradient. Read from its
    source; 5.25 backpropagates each rank's own share."""
    from transformers.integrations import deepspeed

    compute_loss = getattr(deepspeed, "deepspeed_sp_compute_loss", None)
    return compute_loss is not None and "nn.functional.all_gather" in inspect.getsource(compute_loss)


def deepspeed_sequence_parallel(trainer) -> int:
    """Set a trainer up for `ParallelismConfig(sp_backend="deepspeed", sp_size=N)` (`TrainingArguments(
    parallelism_config=…)` or accelerate's config); returns `N` (1: not asked, nothing done).

    DeepSpeed's Ulysses wraps the attention function the model runs (`UlyssesSPAttentionHF`): it
    exchanges heads for tokens, all-gathers `position_ids` and calls the packcollate backend on the whole
    row, which finds the examples from those restarting positions; its loader (`UlyssesSPDataLoaderAdapter`)
    shifts the labels over the whole row before it splits every `(1, N)` tensor into `N` shards. So:

    - the model must run `attn_implementation="packcollate"` (transformers' sdpa under Ulysses gets no
      mask: packed examples would attend to each other) and carry no state along the sequence;
      accelerate only names its built-in kernels in `sp_attn_implementation`, so it is set here;
    - the collator emits no `cu_seq_lens_*` (the loader would split them as tokens) and pads each row
      to a multiple of `N` (`pad_to_multiple_of`; with gloo, whose all-gather needs equal shapes, to
      the token budget `max_tokens_per_batch`, which is then required): the pad is an example of its
      own, never a target;
    - `per_device_train_batch_size=1` (DeepSpeed reshapes by it; a packed batch is one row),
      `loss_weighting="token"` (transformers reduces the model's token-mean loss over the ranks), and
      one row per optimizer step: `gradient_accumulation_steps=1` and a world of one sequence-parallel
      group (transformers' Ulysses loss averages each row's token mean: with several rows a step that is
      not the step's token mean);
    - of TRL's trainers only `SFTTrainer` (`PackedSFTTrainer`): under Ulysses TRL 1.16 runs its fused LM
      head on the pre-shifted `shift_labels` and lets transformers reduce its token-mean loss over the
      ranks, which equals one process in fp32 (gradient checkpointing, SFTConfig's default, included);
    - transformers>=5.25 (`ulysses_loss_on_every_rank`: 5.24's loss makes a step apply `sp_size` times
      the gradient);
      `PackedDPOTrainer` / `PackedRewardTrainer` are not proven there and are refused. Under bf16
      autocast (SFTConfig's default `bf16=True`; CPU autocast with `use_cpu=True`) the gradients differ
      from fp32 by bf16 rounding (about 1% on the tiny test model), in one process as much as split.

    Raises `UnsupportedError` / `InputError` (one line) before the first step otherwise.
    """
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is None or not getattr(pc, "sp_enabled", False):
        return 1
    size = pc.sp_size
    where = f"ParallelismConfig(sp_backend={pc.sp_backend!r}, sp_size={size})"
    if ulysses_loss_on_every_rank():
        import transformers

        raise UnsupportedError(f"{where}: transformers {transformers.__version__} backpropagates the whole row's loss on "
                               f"every rank of the group and DeepSpeed sums their gradients, so each step applies "
                               f"sp_size x the gradient (measured: 2.00x on 2 ranks); upgrade to transformers>=5.25, "
                               f"or use the plain-loop helpers (shard_packed_batch, sequence_parallel_loss)")
    model = trainer.model
    inner = unwrap_model(model)
    name = type(inner).__name__
    trl = next((cls.__name__ for cls in type(trainer).__mro__ if cls.__module__.startswith("trl.")), None)
    if trl is not None and trl != "SFTTrainer":
        raise UnsupportedError(f"{where}: TRL's {trl} under DeepSpeed's Ulysses is not proven equal to one process; "
                               f"expected PackedTrainer or PackedSFTTrainer: train it without sequence parallelism")
    stateful = whole_row_layers(model)
    if stateful:
        raise UnsupportedError(f"{where}: {name} has layers that carry state along the sequence or must see each "
                               f"packed example whole ({', '.join(stateful)}); each rank would see one shard: train it "
                               f"unsplit")
    backend = getattr(inner.config, "_attn_implementation", None)
    if backend != BACKEND_NAME:
        raise UnsupportedError(f"{where}: {name} runs attn_implementation={backend!r}; DeepSpeed's Ulysses gives it no "
                               f"mask and packed examples would attend to each other: build it with "
                               f"attn_implementation={BACKEND_NAME!r}")
    text = inner.config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    if heads is not None:
        kv_repeats(heads, getattr(text, "num_key_value_heads", None) or heads, size, f" ({name}, {where})")
    if trainer.args.per_device_train_batch_size != 1:
        raise InputError(f"{where}: expected per_device_train_batch_size=1 (DeepSpeed reshapes by it; a packed batch "
                         f"is one row: size it with max_tokens_per_batch), got {trainer.args.per_device_train_batch_size}")
    if trainer.loss_weighting != "token":
        raise UnsupportedError(f"{where}: loss_weighting={trainer.loss_weighting!r} is not split across ranks; "
                               f"expected 'token' (the token mean over each row)")
    accumulation = trainer.args.gradient_accumulation_steps
    groups = trainer.args.world_size // size
    if accumulation != 1 or groups != 1:
        raise UnsupportedError(f"{where}: transformers averages each row's token mean over micro-batches and "
                               f"data-parallel groups, not the step's tokens: expected gradient_accumulation_steps=1 "
                               f"and one sequence-parallel group, got {accumulation} and {groups} (the plain-loop "
                               f"helpers weigh them exactly: count_shard_targets)")
    collator = trainer.data_collator
    if not isinstance(collator, PackedCollator):
        raise UnsupportedError(f"{where}: expected packcollate's PackedCollator, got {type(collator).__name__}")
    multiple = size
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        budget = trainer.max_tokens_per_batch
        if budget is None:
            raise InputError(f"{where} on gloo: expected max_tokens_per_batch (every row is padded to it: DeepSpeed's "
                             f"loader all-gathers the ranks' rows, and gloo needs them of one length), got None")
        multiple = math.lcm(budget, size)
    trainer.data_collator = dataclasses.replace(collator, return_flash_attn_kwargs=False, pad_to_multiple_of=multiple)
    handler = pc.sp_handler
    if handler is None:
        from accelerate.utils import DeepSpeedSequenceParallelConfig

        handler = pc.sp_handler = DeepSpeedSequenceParallelConfig()
    handler.sp_attn_implementation = BACKEND_NAME  # accelerate validates only its built-in names
    try:
        import deepspeed
    except ImportError as error:
        raise UnsupportedError(f"{where}: DeepSpeed is not installed (pip install deepspeed)") from error
    if dist.is_available() and dist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # the process group torchrun started
    return size
