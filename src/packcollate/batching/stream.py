"""Token-budget batches from a stream: an online packer over a bounded buffer.

`TokenBudgetBatchSampler` plans a whole epoch from the lengths of every example; a stream
(`datasets.Dataset.to_iterable_dataset()`, `load_dataset(..., streaming=True)`, a generator) has
no lengths up front and no indices. `TokenBudgetStream` wraps the stream and yields, for this
rank, lists of examples whose tokens sum to at most `max_tokens`:

    stream = TokenBudgetStream(dataset.to_iterable_dataset(), max_tokens=16384)
    loader = DataLoader(stream, batch_size=None, collate_fn=PackedCollator())   # one batch per item

`PackedTrainer(max_tokens_per_batch=...)` builds it by itself for an iterable dataset.

How batches are made:

1. read examples into a buffer; every `buffer_size` new examples, pack the buffer into bins of at
   most `max_tokens` tokens by best-fit decreasing (`"bfd"`, default), first-fit decreasing
   (`"ffd"`) or in order (`"greedy"`), vectorised over the buffer (`bins.pack_bins`);
2. keep the `c` least-filled bins (`1 <= c <= num_replicas`, so that the bins handed out are a
   multiple of `num_replicas`) in the buffer for the next round: a part-filled bin is completed by
   later examples instead of being trained part-filled. A round that would hand out fewer than
   `num_replicas` bins keeps everything and reads `buffer_size` more;
3. group the other bins into steps of `num_replicas` bins of similar tokens (one per rank), in
   random order (`shuffle=True`, seeded by `(seed, epoch)`) or packing order, as the sampler does
   (`bins.group_steps`);
4. when the stream ends, pack the rest and make its bins a multiple of `num_replicas` exactly as
   the sampler does (`bins.equal_counts`: repack the least-filled bins into more, or merge);
   when there are too few examples left for that, the missing bins are *padding batches*: one
   copy of the shortest example left, every label -100 (no targets: they add nothing to the loss
   or to its token count, `padding_batches` counts them).

Every rank reads the whole stream and computes the same plan (nothing is communicated), then keeps
its own batch of every step: the stream must yield the same examples in the same order on every
rank (true for `datasets` streams, seeded shuffles and plain generators), as with accelerate's
`IterableDatasetShard`. Only this rank's batches are collated.

Guarantees, per pass over the stream, over all ranks together:

| guarantee | how |
| --- | --- |
| every example exactly once | bins partition the examples read; carried bins are handed out later, never twice |
| no batch over `max_tokens` | bins never exceed it; a longer example raises (`overflow="error"`, naming its position in the stream) or gets a batch of its own (`overflow="own_batch"`, counted in `oversized_examples`) |
| the same number of steps on every rank | every step holds `num_replicas` bins; the end is evened out (4.), so no rank waits for a collective the others never call |
| bounded memory | `buffer_size` new examples plus the bins kept from the last round: `num_replicas` of them, or fewer than `2 * num_replicas` bins' worth when a round hands out nothing |
| deterministic, resumable | the plan depends only on the stream, `(seed, epoch)` and the arguments; `state_dict()` / `load_state_dict()` resume mid-stream (by reading the stream again up to the step reached, without collating) |

`num_workers > 1` in the `DataLoader` is refused: each worker would read (a shard of) the stream
on its own and the plan would no longer be shared.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import InputError, check_non_negative_int, check_positive_int
from ..layout import IGNORE_INDEX
from .bins import Bins, check_packing_options, equal_counts, group_steps, pack_bins
from .ranks import check_state_keys, distributed_default

DEFAULT_BUFFER_SIZE = 1024

logger = logging.getLogger("packcollate")


#: The largest token count an example may claim (int64 arithmetic of the packer stays exact far below it).
MAX_EXAMPLE_TOKENS = 2**40


def token_count(value) -> int:
    """Tokens of one example's ids: `L` for `(L,)`, and for a processor's batched `(1, L)` (what the
    collators emit for it), never the `1` of `len` on a `(1, L)` value."""
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) == 2 and shape[0] == 1:
        return int(shape[1])
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        return len(value[0])
    return len(value)


def example_tokens(example: Mapping, position: int, column: str = "input_ids") -> int:
    """Tokens of one streamed example: `len(example[column])` (a `(1, L)` value counts `L`), checked
    against its `length` field when it has both; the `length` field alone when it has no `column`.

    Raises InputError (a ValueError) naming the stream `position` and the key when the example has
    neither, is empty, or its `length` is not a positive int or disagrees with its tokens.
    """
    if not isinstance(example, Mapping):
        raise InputError(f"stream example {position}: expected a dict of features, got {type(example).__name__}")
    if column in example:
        try:
            tokens = token_count(example[column])
        except TypeError:
            raise InputError(f"stream example {position}, key {column!r}: expected a sequence of token ids, got "
                             f"{type(example[column]).__name__}") from None
        if tokens < 1:
            raise InputError(f"stream example {position}, key {column!r}: expected at least one token, got 0 tokens")
        if "length" in example and example["length"] != tokens:
            raise InputError(
                f"stream example {position}, key 'length': expected the {tokens} tokens of its {column!r} (the token "
                f"budget counts them), got {example['length']!r}"
            )
        return tokens
    if "length" not in example:
        raise InputError(f"stream example {position}: expected a 'length' or {column!r} key, got keys {sorted(example)}")
    value = example["length"]
    value = check_positive_int(f"stream example {position}, key 'length'", value)
    if value > MAX_EXAMPLE_TOKENS:
        raise InputError(f"stream example {position}, key 'length': expected at most {MAX_EXAMPLE_TOKENS} tokens, got {value}")
    return value


def padding_example(example: Mapping) -> dict:
    """A copy of `example` with every label -100: a batch of it has no targets.

    Per-token keys other than `labels` are kept (the collator checks them against `input_ids`). An
    example without `input_ids` (a preference pair: its loss has no labels to mask) cannot be made
    target-free: InputError naming it, never a padding copy that would be trained.
    """
    if "input_ids" not in example:
        raise InputError(
            f"stream end: a rank is left without a batch, and its padding batch "
            f"must have no targets (labels -100), which needs 'input_ids'; got keys {sorted(example)} (a preference "
            f"pair's loss cannot be masked). Give the stream at least num_replicas examples more, or use fewer ranks"
        )
    padded = copy.deepcopy(dict(example))
    padded["labels"] = [IGNORE_INDEX] * token_count(padded["input_ids"])
    return padded


class TokenBudgetStream(IterableDataset):
    """Yield this rank's token-budget batches (lists of examples) from a stream (see the module docstring).

    Use as `DataLoader(TokenBudgetStream(stream, max_tokens), batch_size=None, collate_fn=PackedCollator())`
    and call `set_epoch(epoch)` before every pass, as with `DistributedSampler`.

    Args:
        examples: an iterable of example dicts (re-iterable for several epochs): a
            `datasets.IterableDataset`, a torch `IterableDataset`, a list, ... An example's tokens are
            its `length` field, else `len(example[length_column])`.
        max_tokens: token budget of one batch on one rank; None to batch by count (`max_examples`).
        max_examples: with `max_tokens=None`, batches of at most this many examples (every example
            counts as 1 token; the same packing, carrying and even end).
        buffer_size: new examples read between two packing rounds (default 1024). Larger buffers
            pack tighter (see `benchmarks/stream_fill.py`) and hold more examples in memory.
        strategy: `"bfd"` (default), `"ffd"` or `"greedy"`, as in `TokenBudgetBatchSampler`.
        shuffle: hand out the steps of each packing round in random order, seeded by `(seed, epoch)`
            (default True); False keeps packing order (evaluation).
        seed: base seed.
        num_replicas, rank: data-parallel ranks and this rank; default from `torch.distributed`.
        overflow: an example longer than `max_tokens`: `"error"` (default) or `"own_batch"`.
        length_column: the token column measured when an example has no `length` (default `input_ids`).

    Attributes:
        max_tokens: the budget of a batch (examples when `by_count`, i.e. built with `max_examples`).
        epoch: the epoch `set_epoch` chose.
        examples_read, oversized_examples, padding_batches: counts of the last (or current) pass.
    """

    def __init__(
        self,
        examples: Iterable[Mapping],
        max_tokens: int | None,
        *,
        max_examples: int | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        strategy: str = "bfd",
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        overflow: str = "error",
        length_column: str = "input_ids",
    ) -> None:
        if not isinstance(examples, Iterable) or isinstance(examples, (str, bytes, Mapping)):
            raise InputError(f"examples: expected an iterable of example dicts, got {type(examples).__name__}")
        self.examples = examples
        if (max_tokens is None) == (max_examples is None):
            raise InputError(
                f"expected exactly one of max_tokens and max_examples, got max_tokens={max_tokens!r}, "
                f"max_examples={max_examples!r}"
            )
        self.by_count = max_tokens is None
        self.max_tokens = check_positive_int("max_examples" if self.by_count else "max_tokens",
                                             max_examples if self.by_count else max_tokens)
        self.buffer_size = check_positive_int("buffer_size", buffer_size)
        check_packing_options(strategy, overflow)
        check_non_negative_int("seed", seed)
        self.num_replicas, self.rank = distributed_default(num_replicas, rank)
        self.strategy = strategy
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.overflow = overflow
        self.length_column = length_column
        self.epoch = 0
        self.examples_read = 0
        self.oversized_examples = 0
        self.padding_batches = 0
        self._skip = 0  # steps the next pass skips (load_state_dict)
        self._yielded = 0  # steps of this pass handed out so far
        self._one_shot = isinstance(examples, Iterator)  # a generator / iterator: one pass only
        # set by a pass in a DataLoader worker process; in shared memory, so the main process's copy sees it
        self._worker_pass = torch.zeros((), dtype=torch.bool).share_memory_()
        # (epoch, steps) of the last pass read to its end, also when a worker process read it
        self._finished = torch.full((2,), -1, dtype=torch.long).share_memory_()
        self._passes = 0

    # -- the plan (the same on every rank) ----------------------------------------------------------

    def steps(self) -> Iterator[list[list[dict]]]:
        """Every step of the current epoch's pass, for all ranks: `num_replicas` batches (lists of examples)."""
        if self._one_shot and self._passes:
            raise InputError(
                f"examples: expected a re-iterable stream for another pass (epoch {self.epoch}), got a one-shot "
                f"{type(self.examples).__name__} already read by an earlier pass; pass a list, a "
                f"datasets.IterableDataset or a torch IterableDataset (or train one pass: max_steps within it)"
            )
        self._passes += 1
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        self.examples_read = self.oversized_examples = self.padding_batches = 0
        buffer: list[dict] = []
        lengths: list[int] = []
        fresh = 0
        for example in self.examples:
            tokens = 1 if self.by_count else example_tokens(example, self.examples_read, self.length_column)
            if tokens > self.max_tokens:
                if self.overflow == "error":
                    raise InputError(
                        f"stream example {self.examples_read}: expected at most max_tokens={self.max_tokens} tokens, "
                        f"got {tokens}; use overflow='own_batch' to give it a batch of its own"
                    )
                if not self.oversized_examples:
                    logger.warning(
                        "stream example %d: %d tokens, over the budget max_tokens=%d: it gets a batch of its own, over "
                        "the budget (reported once per pass; counted in oversized_examples); give the collator "
                        "max_seq_length to truncate or split such examples",
                        self.examples_read, tokens, self.max_tokens,
                    )
                self.oversized_examples += 1
            self.examples_read += 1
            buffer.append(example)
            lengths.append(tokens)
            fresh += 1
            if fresh >= self.buffer_size:
                fresh = 0
                array = np.asarray(lengths, dtype=np.int64)
                emitted, kept = self._split_off_carry(self._pack(array), array)
                if len(emitted.sizes):
                    yield from self._group(emitted, buffer, array, rng)
                    keep = kept.items.tolist()
                    buffer = [buffer[i] for i in keep]
                    lengths = [lengths[i] for i in keep]
        if buffer:
            yield from self._last_steps(buffer, np.asarray(lengths, dtype=np.int64), rng)

    def _pack(self, lengths: np.ndarray) -> Bins:
        """Bins of the buffer's examples `(m,)` (indices into `lengths` `(m,)`, one window), longer ones alone."""
        return pack_bins(lengths, np.arange(len(lengths)), self.max_tokens, self.strategy)

    def _split_off_carry(self, bins: Bins, lengths: np.ndarray) -> tuple[Bins, Bins]:
        """(bins handed out now, a multiple of `num_replicas`; the `1 … num_replicas` least-filled
        bins, kept for the next round). Fewer than `num_replicas` bins to hand out: all are kept."""
        carry = (len(bins.sizes) - 1) % self.num_replicas + 1
        if len(bins.sizes) - carry < self.num_replicas:  # nothing to hand out yet: keep reading
            return Bins(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)), bins
        least = np.argsort(bins.tokens(lengths), kind="stable")[:carry]
        out = np.ones(len(bins.sizes), dtype=bool)
        out[least] = False
        return bins.take(np.flatnonzero(out)), bins.take(least)

    def _last_steps(self, buffer: list[dict], lengths: np.ndarray, rng) -> Iterator[list[list[dict]]]:
        """Pack the rest of the stream into a multiple of `num_replicas` bins, padding when too few."""
        bins = self._pack(lengths)
        even = equal_counts(bins, lengths, self.max_tokens, self.num_replicas, drop_last=False)
        if even is not None:
            bins = even[0]
        elif len(lengths) <= self.num_replicas:  # too few examples left to give every rank a batch: one each
            bins = Bins(np.arange(len(lengths), dtype=np.int64), np.ones(len(lengths), dtype=np.int64),
                        lengths <= self.max_tokens)
        pad = -len(bins.sizes) % self.num_replicas
        if pad:
            shortest = int(np.argmin(lengths))
            buffer = [*buffer, padding_example(buffer[shortest])]
            lengths = np.append(lengths, lengths[shortest])
            bins = Bins(
                np.concatenate([bins.items, np.full(pad, len(buffer) - 1, dtype=np.int64)]),
                np.concatenate([bins.sizes, np.ones(pad, dtype=np.int64)]),
                np.concatenate([bins.packable, np.zeros(pad, dtype=bool)]),
            )
            self.padding_batches += pad
        yield from self._group(bins, buffer, lengths, rng)

    def _group(self, bins: Bins, buffer: list[dict], lengths: np.ndarray, rng) -> Iterator[list[list[dict]]]:
        """Steps of `num_replicas` bins of similar tokens, in random or packing order (`bins.group_steps`)."""
        runs = bins.runs()
        for step in group_steps(bins.tokens(lengths), self.num_replicas, rng).tolist():
            yield [[buffer[i] for i in runs[b].tolist()] for b in step]

    # -- this rank's batches -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[list[dict]]:
        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise InputError(
                f"TokenBudgetStream: expected at most 1 DataLoader worker, got num_workers={worker.num_workers}: "
                f"each worker would read the stream on its own and the ranks' plan would differ"
            )
        if hasattr(self.examples, "set_epoch"):
            self.examples.set_epoch(self.epoch)
        if worker is not None:
            self._worker_pass.fill_(True)  # shared with the main process's copy: its state_dict refuses
        start, self._skip = self._skip, 0
        self._yielded = start
        planned = 0
        for planned, step in enumerate(self.steps(), start=1):
            if planned <= start:
                continue
            self._yielded += 1
            yield step[self.rank]
        self._finished[0], self._finished[1] = self.epoch, planned
        if planned < start:
            raise InputError(
                f"state: expected steps_yielded within the pass (epoch {self.epoch} has {planned} steps), got {start}; "
                f"the state is not of this stream"
            )

    def set_epoch(self, epoch: int) -> None:
        """Plan `epoch` next (forwarded to the stream's own `set_epoch`, which reshuffles a `datasets` stream)."""
        check_non_negative_int("epoch", epoch)
        if epoch != self.epoch:
            self._skip = self._yielded = 0
        self.epoch = int(epoch)

    def _configuration(self) -> dict:
        """What the plan of a pass depends on besides `(seed, epoch)`: a state resumes only the same plan."""
        return {"max_tokens": self.max_tokens, "by_count": self.by_count, "buffer_size": self.buffer_size,
                "strategy": self.strategy, "shuffle": self.shuffle, "overflow": self.overflow,
                "length_column": self.length_column}

    def state_dict(self) -> dict:
        """`{"epoch", "seed", "steps_yielded", "num_replicas", "configuration"}`: enough to resume this pass.

        `steps_yielded` counts batches handed out; a prefetching `DataLoader` takes some before they
        are trained on: save the number of steps trained instead when they differ. A stream iterated
        in a `DataLoader` worker process (`num_workers=1`) is refused: the steps were counted there.
        """
        if self._worker_pass.item():
            raise InputError(
                "state_dict: this stream was iterated in a DataLoader worker process (num_workers=1), which counts "
                "its steps in its own copy; use num_workers=0 to save a state, or build one from the steps you "
                "trained: {**stream.state_dict_of(steps_trained)}"
            )
        return self.state_dict_of(self._yielded)

    def state_dict_of(self, steps: int) -> dict:
        """The state of this pass after `steps` steps (e.g. the steps trained, behind a prefetching loader)."""
        return {"epoch": self.epoch, "seed": self.seed, "steps_yielded": check_non_negative_int("steps", steps),
                "num_replicas": self.num_replicas, "configuration": self._configuration()}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next pass skips the first `steps_yielded` steps (reading, not collating, them).

        Every value is checked before anything changes: a state of another configuration (budget,
        buffer, strategy, shuffle, replicas) is refused, and a `steps_yielded` beyond the pass raises
        when the pass ends before it.
        """
        if not isinstance(state, Mapping):
            raise InputError(f"state: expected a dict from state_dict(), got {type(state).__name__}")
        check_state_keys(state, ("epoch", "seed", "steps_yielded"), self.num_replicas)
        epoch = check_non_negative_int("state['epoch']", state["epoch"])
        seed = check_non_negative_int("state['seed']", state["seed"])
        skip = check_non_negative_int("state['steps_yielded']", state["steps_yielded"])
        saved = state.get("configuration", self._configuration())
        if saved != self._configuration():
            differ = {k: saved.get(k) for k in self._configuration() if saved.get(k) != self._configuration()[k]}
            raise InputError(
                f"state: expected a state of this stream's configuration {self._configuration()}, got one saved with "
                f"{differ} (its steps are another plan's: examples would be skipped or repeated)"
            )
        self.epoch, self.seed = epoch, seed
        self._skip = self._yielded = skip

    def steps_in_pass(self, epoch: int) -> int | None:
        """The steps of `epoch`'s pass when it was read to its end (here or in a worker process), else None."""
        finished_epoch, steps = self._finished.tolist()
        return steps if finished_epoch == epoch else None
