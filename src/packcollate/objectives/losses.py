"""Sequence-weighted next-token loss: every example weighs the same, however long.

The token-mean loss (what `Trainer` and the model compute) weighs every *token* the same, so a long
example counts as much as many short ones. The sequence-weighted loss of one optimizer step is

    L = (1 / E) * sum over examples e of  (1 / T_e) * sum over targets t of e of  CE(e, t)

where the examples `e` are those of every micro-batch of the step (gradient accumulation) on every
rank that have at least one target (`T_e >= 1` labels other than -100 predicted inside the example;
the first token of an example is never a target), and `E` is their number, all-reduced over the
ranks. Examples without targets weigh 0 and are not counted. This is the same number and the same
gradients as the mean, over all examples of the step, of each padded row's mean token loss.

Each micro-batch contributes `sum_e mean_e / E`; summed over micro-batches (backward accumulates)
and over ranks it is `L`. DDP *averages* gradients over ranks, so multiply by the world size:

    for step in micro_batches(loader, accumulation_steps):
        n = count_loss_examples(step)                           # all micro-batches, all ranks
        for batch in step:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            loss = sequence_weighted_loss(logits, batch["labels"], batch["cu_seq_lens_q"], n)
            (loss * world_size).backward()
        optimizer.step(); optimizer.zero_grad()

`PackedTrainer` / `PackedSFTTrainer` do this with `loss_weighting="sequence"`.

The summed token loss (open-instruct's `--reduce_loss sum`) weighs every target token by 1 and divides
by a constant, never by a count of tokens: the loss of one optimizer step is

    L = (1 / (G * W)) * sum over every target t of the step (all micro-batches, all ranks) of CE(t)

with `G` the configured gradient accumulation steps and `W` the number of ranks (DDP and DeepSpeed
average gradients over ranks: that is the `1 / W`). A step with more target tokens takes a larger
step. In a loop: `(summed_token_loss(logits, labels) / accumulation_steps).backward()`;
`PackedTrainer` / `PackedSFTTrainer` do this with `loss_weighting="sum"`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import InputError, MissingKeyError
from ..layout import IGNORE_INDEX
from .segments import segment_starts, segment_sum, token_logprobs


def _targets(labels: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """`(N,)` bool: the label of token `t` is predicted (not -100, not the first token of an example)."""
    flat = labels.reshape(-1)
    return (flat != IGNORE_INDEX) & ~segment_starts(cu_seq_lens.to(flat.device).long(), flat.shape[0])


def examples_with_targets(labels: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """`(k,)` bool: which examples of a packed row `(1, N)` have at least one target."""
    return segment_sum(_targets(labels, cu_seq_lens).long(), cu_seq_lens.to(labels.device)) > 0


def sum_over_step(counts: Iterable[torch.Tensor], *, across_ranks: bool = True, kind: str = "") -> torch.Tensor:
    """The sum of the 0-d counts of a step's micro-batches (one per batch), all-reduced over ranks
    when `across_ranks` and `torch.distributed` runs. Raises ValueError for a step of no batch;
    `kind` names the batches the message expects (e.g. `" with 'labels'"`)."""
    total = None
    for count in counts:
        total = count if total is None else total + count
    if total is None:
        raise InputError(f"batches: expected at least one batch{kind}, got none")
    if across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total


def _examples_with_targets(index: int, batch: dict) -> torch.Tensor:
    if "labels" not in batch or "cu_seq_lens_q" not in batch:
        raise MissingKeyError(f"batch {index}: expected a packed batch with 'labels' and 'cu_seq_lens_q', got {sorted(batch)}")
    return examples_with_targets(torch.as_tensor(batch["labels"]), torch.as_tensor(batch["cu_seq_lens_q"])).sum()


def count_loss_examples(batches: Iterable[dict], *, across_ranks: bool = True) -> torch.Tensor:
    """Examples with at least one target in packed `batches` (dicts with `labels` `(1, N)` and
    `cu_seq_lens_q` `(k+1,)`), summed over ranks when `torch.distributed` runs: the `E` of the
    module docstring. A 0-d int64 tensor on the labels' device."""
    return sum_over_step((_examples_with_targets(i, b) for i, b in enumerate(batches)), across_ranks=across_ranks)


def per_example_token_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of every example of a packed row: `(1, N, V)`, `(1, N)`,
    `(k+1,)` -> `(k,)`; 0 for an example without targets."""
    cu = cu_seq_lens.to(logits.device).long()
    nll = -token_logprobs(logits, labels, cu)  # (1, N), 0 where not a target
    targets = _targets(labels.to(logits.device), cu)
    counts = segment_sum(targets.to(nll.dtype), cu).clamp(min=1)
    return segment_sum(nll, cu) / counts


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum of next-token cross-entropy over every target of a batch (not a mean).

    Args:
        logits: `(B, N, V)`: a packed row (`B = 1`) or a padded batch.
        labels: `(B, N)`, unshifted (-100: not a target). Position `t` predicts `labels[:, t + 1]`; in a
            packed row the first token of every example is -100, so no prediction crosses examples.
    Returns a 0-d float32 tensor (float64 for float64 logits).
    """
    if logits.shape[:2] != labels.shape:
        raise InputError(f"labels: expected shape {tuple(logits.shape[:2])} (the logits' first two dims), "
                         f"got {tuple(labels.shape)}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    predicted = logits[:, :-1].reshape(-1, logits.shape[-1]).to(dtype)
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    return torch.nn.functional.cross_entropy(predicted, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def sequence_weighted_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    num_examples: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the sequence-weighted loss: `sum_e mean_e / num_examples`.

    Args:
        logits: `(1, N, V)` the model's logits on the packed row.
        labels: `(1, N)` the row's labels (-100: not a target), unshifted as the collator gives them.
        cu_seq_lens: `(k+1,)` example offsets.
        num_examples: `E`, the examples with targets of the whole optimizer step over all ranks
            (`count_loss_examples`); default: those of this batch (the loss is then the plain mean
            over its examples).
    Returns a 0-d float32 tensor (float64 for float64 logits).
    """
    per_example = per_example_token_loss(logits, labels, cu_seq_lens)
    here = examples_with_targets(labels.to(logits.device), cu_seq_lens).sum()
    if num_examples is None:
        num_examples = here.clamp(min=1)
    else:
        count = torch.as_tensor(num_examples)
        if count.numel() != 1 or count.dtype.is_floating_point or count.dtype == torch.bool or int(count) < int(here):
            raise InputError(
                f"num_examples: expected an int >= {int(here)} (the examples with targets of the whole step, over "
                f"every micro-batch and rank: count_loss_examples), got {num_examples!r}"
            )
        num_examples = count.clamp(min=1)  # 0: a step without targets, this batch's loss is 0
    return per_example.sum() / torch.as_tensor(num_examples, device=per_example.device).to(per_example.dtype)
