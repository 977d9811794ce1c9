"""Before the first step: measure every split against `max_seq_length` and the model's context limit.

Lit-GPT set `max_seq_length` from the training split and crashed on a longer validation example
after hours of training. `check_split_lengths` measures every split the trainer was given (train and
each eval split; streams cannot be measured up front and are named as such) and:

- raises ValueError naming split, example, length and limit when an example would reach the model
  longer than its positions (`n_positions`, `max_position_embeddings`, … read from the config),
  instead of an `IndexError` in the embedding mid-run; or when `overflow="error"` would stop the
  run on a long example;
- otherwise returns one message (the trainer logs it once) saying how many examples of each split
  exceed `max_seq_length`, what the length policy does to them, and the `max_seq_length` that
  covers every split.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..lengths import context_length, recommend_max_seq_length

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
        max_seq_length, overflow: the collator's length policy (`packcollate.lengths`).
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
            raise ValueError(
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
            raise ValueError(
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


def check_trainer_splits(train_dataset, eval_dataset, collator, model) -> str | None:
    """`check_split_lengths` for a trainer's splits (`eval_dataset` may be a dict of named splits),
    its collator's length policy and its model's context limit."""
    from .streams import is_stream
    from .trainer import example_lengths

    evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
    named = {"train": train_dataset, **{name if name == "eval" else f"eval '{name}'": d for name, d in evals.items()}}
    splits, unmeasured = {}, []
    for name, dataset in named.items():
        if dataset is None:
            continue
        try:
            lengths = None if is_stream(dataset) else example_lengths(dataset)
        except (KeyError, TypeError):  # no `input_ids` yet (raw text a custom collator tokenizes)
            lengths = None
        if lengths is None:
            unmeasured.append(name)
        else:
            splits[name] = lengths
    limit, key = context_length(getattr(model, "config", None))
    return check_split_lengths(
        splits, max_seq_length=getattr(collator, "max_seq_length", None),
        overflow=getattr(collator, "overflow", "truncate"), context_limit=limit, context_key=key,
        unmeasured=tuple(unmeasured),
    )
