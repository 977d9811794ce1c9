"""Checks a trainer runs before its first step, each given the trainer (nothing found on the stack).

Columns. The plain `transformers.Trainer` keeps only the dataset columns its model's `forward` names
(`remove_unused_columns=True`, the default): `completion_mask` and `assistant_masks` are removed
before the collator sees a row, and a completion-only run silently trains on every token.
`check_trainer_keeps_masks(trainer)` raises when a split has a mask column the trainer's kept columns
leave out while its collator would apply it. `PackedTrainer` (and the TRL trainers) keep those
columns and run the check at train and evaluation start; with a plain `Trainer`, call it yourself
(or use `remove_unused_columns=False`).

Lengths. Lit-GPT set `max_seq_length` from the training split and crashed on a longer validation
example after hours of training. `check_split_lengths` measures every split (train and each eval
split; streams cannot be measured up front and are named as such) and:

- raises ValueError naming split, example, length and limit when an example would reach the model
  longer than its positions (`n_positions`, `max_position_embeddings`, … read from the config),
  instead of an `IndexError` in the embedding mid-run; or when `overflow="error"` would stop the
  run on a long example;
- otherwise returns one message (the trainer logs it once) saying how many examples of each split
  exceed `max_seq_length`, what the length policy does to them, and the `max_seq_length` that
  covers every split.

Launch. Measured with accelerate 1.16, torch 2.13, on CPU:

- `accelerate launch --num_processes 2 script.py` starts one process (no GPU, no `--multi_gpu`);
  `accelerate launch --multi_gpu --num_processes 2 script.py` or `torchrun --nproc_per_node 2
  script.py` start two (gloo on CPU): `assert_processes` refuses the first; two processes started without
  `use_cpu=True` train unsynchronised or each alone (`assert_processes`, run by `PackedTrainer` at train start);
- `accelerate launch --use_fsdp …` and `TrainingArguments(fsdp=…)` run DDP (`MULTI_CPU`, the model a
  `DistributedDataParallel`): accelerate's FSDP plugin is only used on accelerators
  (`assert_fsdp_active` refuses). FSDP2's own `torch.distributed.fsdp.fully_shard` works on CPU with
  gloo (`examples/fsdp2_loop.py`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ..batching.lengths import recommend_max_seq_length
from ..collate.features import MASK_KEYS
from ..compat.configs import context_length
from ..errors import InputError, LaunchError
from .streams import is_stream

# ---------------------------------------------------------------------------------------------
# Columns
# ---------------------------------------------------------------------------------------------


def _datasets(trainer) -> dict:
    """{split name: dataset} of the trainer's training and evaluation data."""
    found = {"training": trainer.train_dataset}
    eval_dataset = trainer.eval_dataset
    if isinstance(eval_dataset, dict):
        found.update({f"evaluation ({name})": dataset for name, dataset in eval_dataset.items()})
    else:
        found["evaluation"] = eval_dataset
    return {name: dataset for name, dataset in found.items() if dataset is not None}


def removed_masks(trainer) -> dict[str, list[str]]:
    """{split: mask columns that `trainer` removes from it before collation}; empty when none is removed."""
    if not getattr(trainer.args, "remove_unused_columns", False):
        return {}
    trainer._set_signature_columns_if_needed()
    kept = set(trainer._signature_columns or ())
    removed = {}
    for name, dataset in _datasets(trainer).items():
        columns = getattr(dataset, "column_names", None) or ()
        masks = [key for key in MASK_KEYS if key in columns and key not in kept]
        if masks:
            removed[name] = masks
    return removed


def check_trainer_keeps_masks(trainer) -> None:
    """Raise ValueError when `trainer` removes mask columns that its collator would apply."""
    collator = trainer.data_collator
    if not getattr(collator, "completion_only_loss", False):
        return
    removed = removed_masks(trainer)
    if not removed:
        return
    masks = sorted({mask for split_masks in removed.values() for mask in split_masks})
    model = type(trainer.model).__name__
    raise InputError(
        f"{type(collator).__name__}: expected the {' and '.join(repr(m) for m in masks)} column of the "
        f"{' and '.join(removed)} dataset to reach "
        f"the collator, got rows without it: {type(trainer).__name__}(remove_unused_columns=True) removes it because "
        f"{model}.forward does not take it, so the prompt would be trained on. Fix: use "
        "packcollate.integrations.PackedTrainer (it keeps the mask columns), or TrainingArguments("
        "remove_unused_columns=False), or completion_only_loss=False to train on every token"
    )


# ---------------------------------------------------------------------------------------------
# Lengths
# ---------------------------------------------------------------------------------------------

_EFFECT = {"truncate": "truncated", "split": "split into pieces", "drop": "dropped (not trained or evaluated on)"}


def check_split_lengths(
    splits: Mapping[str, np.ndarray],
    *,
    max_seq_length: int | None,
    overflow: str,
    context_limit: int | None,
    context_key: str | None = None,
    unmeasured: tuple[str, ...] = (),
) -> str | None:
    """Check example lengths `(n,)` of each split; see the module docstring. Returns a message or None.

    Args:
        splits: `{name: (n,) int lengths}`.
        max_seq_length, overflow: the collator's length policy (`packcollate.collate.lengths`).
        context_limit, context_key: the model's context length and the config key it came from.
        unmeasured: names of splits that could not be measured (streams, rows without `input_ids`).
    """
    cuts = max_seq_length is not None and overflow != "error"
    lines = []
    for name, lengths in splits.items():
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            continue
        reaching = np.minimum(lengths, max_seq_length) if cuts else lengths
        if context_limit is not None and (reaching > context_limit).any():
            first = int(np.flatnonzero(reaching > context_limit)[0])
            raise InputError(
                f"{name} split, example {first}: expected at most {context_limit} tokens (the model's "
                f"{context_key}), got {int(lengths[first])} ({int((reaching > context_limit).sum())} of {len(lengths)} "
                f"examples are longer); give the collator max_seq_length={context_limit} (overflow='truncate' or "
                f"'split') or drop them from the split"
            )
        if max_seq_length is None:
            continue
        over = lengths > max_seq_length
        if not over.any():
            continue
        first = int(np.flatnonzero(over)[0])
        if overflow == "error":
            raise InputError(
                f"{name} split, example {first}: expected at most max_seq_length={max_seq_length} tokens, got "
                f"{int(lengths[first])} ({int(over.sum())} of {len(lengths)} examples are longer); overflow='error' "
                f"would stop the run there: choose overflow='truncate', 'split' or 'drop', or a larger max_seq_length"
            )
        lines.append(
            f"{name} split: {int(over.sum())} of {len(lengths)} examples are longer than max_seq_length={max_seq_length} "
            f"(longest {int(lengths.max())}, first: example {first}) and will be {_EFFECT[overflow]}"
        )
    if unmeasured:
        lines.append(f"not measured (streams, or no input_ids yet): {', '.join(unmeasured)}")
    if not any("longer than" in line for line in lines):
        return "; ".join(lines) or None
    measured = {name: lengths for name, lengths in splits.items() if len(lengths)}
    cover = recommend_max_seq_length(measured, context_limit, headroom=0.0, multiple=1)
    longest = max(int(np.max(lengths)) for lengths in measured.values())
    if cover < longest:
        return "; ".join(lines) + (f". No max_seq_length covers the longest example ({longest}) within the model's "
                                   f"{context_key}={context_limit}: the longer ones need the length policy")
    limit = f" (the model's {context_key} is {context_limit})" if context_limit else ""
    return "; ".join(lines) + f". max_seq_length={cover} covers every measured split{limit}"


def check_trainer_splits(trainer) -> str | None:
    """`check_split_lengths` for `trainer`'s splits (`eval_dataset` may be a dict of named splits),
    the length policy of its collator and its model's context limit; the trainer measures each split
    as its token budget does (`trainer.example_lengths`, TRL's vision path counts image tokens)."""
    train_dataset, eval_dataset, collator = trainer.train_dataset, trainer.eval_dataset, trainer.data_collator
    evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
    named = {"train": train_dataset, **{name if name == "eval" else f"eval '{name}'": d for name, d in evals.items()}}
    splits, unmeasured = {}, []
    for name, dataset in named.items():
        if dataset is None:
            continue
        try:
            lengths = None if is_stream(dataset) else trainer.example_lengths(dataset)
        except (KeyError, TypeError):  # no `input_ids` yet (raw text a custom collator tokenizes)
            lengths = None
        if lengths is None:
            unmeasured.append(name)
        else:
            splits[name] = lengths
    limit, key = context_length(getattr(trainer.model, "config", None))
    return check_split_lengths(
        splits, max_seq_length=getattr(collator, "max_seq_length", None),
        overflow=getattr(collator, "overflow", "truncate"), context_limit=limit, context_key=key,
        unmeasured=tuple(unmeasured),
    )


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------


def _fsdp_asked(args) -> str | None:
    """How FSDP was asked for: `TrainingArguments(fsdp=…)` or `accelerate launch --use_fsdp`; None if not."""
    options = getattr(args, "fsdp", None)
    if options:  # True in transformers 5.2x (options moved to fsdp_config), a list of FSDPOption before
        shown = options if isinstance(options, bool) else [str(getattr(o, "value", o)) for o in options]
        return f"TrainingArguments(fsdp={shown})"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "accelerate launch --use_fsdp"
    return None


def assert_fsdp_active(args, accelerator) -> None:
    """Raise RuntimeError when FSDP was asked for but accelerate will not shard the model."""
    asked = _fsdp_asked(args)
    if asked is None or getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return
    raise LaunchError(
        f"FSDP was asked for ({asked}) but accelerate runs {accelerator.distributed_type} and would not shard the "
        f"model (accelerate's FSDP needs an accelerator; on CPU it silently trains with DDP). On CPU, shard with "
        f"FSDP2 in a plain loop: torchrun --nproc_per_node 2 examples/fsdp2_loop.py; or remove fsdp to train with DDP"
    )


def launched_processes() -> int:
    """How many processes the launcher started: torch.distributed's world size once a process group runs,
    else the `WORLD_SIZE` that torchrun, `accelerate launch` and the `deepspeed` launcher set (1 without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


#: The fix for a multi-process launch on CPU that the Trainer does not run as one job.
_USE_CPU = ("on a machine without GPUs pass TrainingArguments(use_cpu=True) (--use_cpu on the command line; "
            "accelerate launch --cpu)")


def assert_processes(accelerator, expected: int | None = None) -> None:
    """Raise RuntimeError (`LaunchError`) unless every launched process trains as one rank of one synchronised job.

    `PackedTrainer` runs it at train start. Measured on CPU (accelerate 1.16, DeepSpeed 0.19) with 2 processes
    started by torchrun or `accelerate launch` and no `use_cpu=True`: with DeepSpeed each rank believes it is
    alone (`AssertionError: Check batch related parameters` when the config has a `train_batch_size`, otherwise
    every rank trains the whole dataset); without it the ranks share the data but never average gradients (two
    unsynchronised runs). Also raises when `expected` processes were asked for and another number runs
    (`accelerate launch --num_processes 2` without `--multi_gpu` starts one on CPU).
    """
    from accelerate.utils import DistributedType

    running = accelerator.num_processes
    if expected is not None and running != expected:
        raise LaunchError(
            f"expected {expected} processes, got {running}: on a machine without GPUs "
            f"`accelerate launch --num_processes {expected}` starts one; use "
            f"`accelerate launch --multi_gpu --num_processes {expected}` or `torchrun --nproc_per_node {expected}`"
        )
    launched = launched_processes()
    kind = getattr(accelerator.distributed_type, "value", accelerator.distributed_type)
    if launched > 1 and running != launched:
        raise LaunchError(
            f"{launched} processes were launched but each trains as 1 of {running} (accelerate: {kind}): every rank "
            f"would train the whole dataset alone (DeepSpeed: 'Check batch related parameters'); {_USE_CPU}"
        )
    if running > 1 and accelerator.distributed_type == DistributedType.NO:
        raise LaunchError(
            f"{running} processes run without a distributed backend (accelerate: {kind}): their gradients would never "
            f"be averaged, {running} unsynchronised runs; {_USE_CPU}"
        )
