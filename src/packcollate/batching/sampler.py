"""Token-budget batch sampler: batches of whole examples whose lengths sum to at most `max_tokens`.

With padding-free batches the cost of a step is its number of tokens, not its number of examples.
`TokenBudgetBatchSampler` picks which examples share a step so that every step is close to the
budget, and hands each data-parallel rank its own batches:

    sampler = TokenBudgetBatchSampler(dataset["length"], max_tokens=16384)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PackedCollator())

This module owns the sampler and its epoch plans (`plan_epoch` -> `EpochPlan`); the packing,
equal-count and step machinery it plans with is `packcollate.batching.bins`, shared with the stream,
and so are the rank defaults and resume checks of `packcollate.batching.ranks`.

How an epoch is planned (once per epoch, lazily, then cached, so `len()` and iteration agree):

1. shuffle the example indices with a generator seeded by `(seed, epoch)` (dataset order when
   `shuffle=False`);
2. pack them into bins of at most `max_tokens` tokens (`bins.pack_bins`): `"bfd"` and `"ffd"`
   sort each window of `window` consecutive examples by length and fill the fullest or the first
   bin each example fits, then pack the windows' least-filled bins again together; `"greedy"`
   fills bins in order (`packcollate.batching.bins` describes them);
3. give every rank the same number of bins, keeping every example exactly once (`bins.equal_counts`,
   below);
4. group bins of similar token counts into steps of `num_replicas` bins (one per rank) and shuffle
   the steps (`bins.group_steps`): randomness across steps comes from steps 1 and 4, never from
   sorting the epoch.

Guarantees, per epoch, over all ranks together:

| guarantee | how |
| --- | --- |
| every example exactly once | packing partitions the indices; `drop_last=True` drops whole bins and counts their examples in `dropped_examples` |
| no batch over `max_tokens` | bins never exceed it; a longer example raises (`overflow="error"`) or gets a batch of its own (`overflow="own_batch"`, counted in `oversized_examples`) |
| equal steps on every rank | when the number of bins is not a multiple of `num_replicas`, the least-filled bins are repacked into more bins; when too few examples fit the budget for that, the packable bins are merged into fewer (or, with `drop_last=True`, the remainder is dropped) |
| small per-step token imbalance | a step holds bins of similar size; the smallest bins are repacked evenly (`rank_imbalance()`) |
| deterministic, resumable | the plan depends only on `(seed, epoch)` and the arguments; `state_dict()` / `load_state_dict()` resume mid-epoch |
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

from ..errors import InputError, check_non_negative_int, check_positive_int, is_int
from ..layout import cumulative
from .bins import (
    DEFAULT_WINDOW,
    Bins,
    check_packing_options,
    equal_counts,
    fallback_bins,
    group_steps,
    pack_bins,
    unequal_counts_error,
)
from .lengths import as_lengths
from .ranks import check_state_keys, distributed_default


@dataclass(frozen=True)
class EpochPlan:
    """The batches of every rank for one epoch.

    Attributes:
        items: `(k,)` int64 dataset indices, batch after batch.
        bounds: `(b+1,)` int64, batch `i` is `items[bounds[i]:bounds[i+1]]`.
        tokens: `(b,)` int64 tokens of each batch.
        steps: `(s, num_replicas)` int64, the batch each rank gets at each step.
        dropped_examples: examples dropped by `drop_last` this epoch.
    """

    items: np.ndarray
    bounds: np.ndarray
    tokens: np.ndarray
    steps: np.ndarray
    dropped_examples: int

    def batch(self, index: int) -> list[int]:
        """The dataset indices of batch `index` (`bounds[index+1] - bounds[index]` of them)."""
        return self.items[self.bounds[index] : self.bounds[index + 1]].tolist()


def plan_epoch(
    lengths: np.ndarray,
    max_tokens: int,
    *,
    rng: np.random.Generator | None,
    strategy: str,
    window: int,
    num_replicas: int,
    drop_last: bool,
    fallback: Bins | None = None,
) -> EpochPlan:
    """Plan one epoch (see the module docstring); `rng=None` keeps the dataset order (no shuffling).

    `fallback` (`fallback_bins`): bins to use when this epoch's own cannot be equalised over ranks.
    """
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    bins = pack_bins(lengths, order, max_tokens, strategy, window)
    equal = equal_counts(bins, lengths, max_tokens, num_replicas, drop_last)
    if equal is None and fallback is not None:
        equal = equal_counts(fallback, lengths, max_tokens, num_replicas, drop_last)
    if equal is None:
        raise unequal_counts_error(num_replicas, len(bins.sizes), len(lengths))
    bins, dropped = equal
    tokens = bins.tokens(lengths)
    steps = group_steps(tokens, num_replicas, rng)  # similar bins share a step; steps shuffled with `rng`
    return EpochPlan(bins.items, cumulative(bins.sizes), tokens, steps, dropped)


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yield lists of dataset indices whose lengths sum to at most `max_tokens` (see the module docstring).

    Use as `DataLoader(dataset, batch_sampler=sampler, collate_fn=PackedCollator())`; call
    `set_epoch(epoch)` at the start of every epoch, as with `DistributedSampler`.

    Args:
        lengths: `(n,)` token count of each example: a list, numpy array, torch tensor or a
            `datasets` column such as `dataset["length"]`. Positive ints; a ValueError names the
            first index that is not.
        max_tokens: token budget of one batch on one rank.
        shuffle: shuffle examples and steps with a generator seeded by `(seed, epoch)` (default
            True); False packs windows in dataset order and keeps steps in that order.
        seed: base seed; the plan of an epoch depends only on `(seed, epoch)` and the other arguments.
        strategy: `"bfd"` (best-fit decreasing, default), `"ffd"` (first-fit decreasing) or
            `"greedy"` (fill in order, new batch when the next example does not fit; ignores `window`).
        num_replicas: data-parallel ranks; default: the world size of `torch.distributed` when it is
            initialised, else 1.
        rank: this rank; default: the `torch.distributed` rank when initialised, else 0.
        drop_last: when the number of batches is not a multiple of `num_replicas`, drop the
            least-filled batches (their examples are counted in `dropped_examples`) instead of
            repacking them into more batches (default False: every example, every epoch).
        overflow: an example longer than `max_tokens`: `"error"` (default, ValueError naming it) or
            `"own_batch"` (a batch of its own, counted in `oversized_examples`; set the collator's
            `max_seq_length` to truncate it).
        window: examples sorted and packed together by `"bfd"` / `"ffd"` (default 4096). Larger
            windows pack a little tighter and plan a little slower; examples only share a batch
            with examples of their window (or with other windows' leftovers).

    Attributes:
        lengths: `(n,)` int64.
        epoch: the epoch `set_epoch` chose (0 at first).
        oversized_examples: examples longer than `max_tokens` (each in a batch of its own).
        dropped_examples: examples this epoch drops (`drop_last=True`; 0 otherwise).
    """

    def __init__(
        self,
        lengths,
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        strategy: str = "bfd",
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        overflow: str = "error",
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.lengths = as_lengths(lengths)
        self.max_tokens = check_positive_int("max_tokens", max_tokens)
        self.window = check_positive_int("window", window)
        check_packing_options(strategy, overflow)
        check_non_negative_int("seed", seed)
        self.num_replicas, self.rank = distributed_default(num_replicas, rank)
        if len(self.lengths) < self.num_replicas:
            raise InputError(
                f"num_replicas={self.num_replicas}: expected at least that many examples so that every rank "
                f"gets a batch, got {len(self.lengths)}"
            )
        over = np.flatnonzero(self.lengths > self.max_tokens)
        if len(over) and overflow == "error":
            i = int(over[0])
            raise InputError(
                f"example {i}: expected at most max_tokens={self.max_tokens} tokens, got {int(self.lengths[i])} "
                f"({len(over)} examples are longer); use overflow='own_batch' to give each a batch of its own"
            )
        self.oversized_examples = len(over)
        # feasibility over ranks is decided here, once: no epoch raises later because of its shuffle
        self._fallback = None if drop_last else fallback_bins(self.lengths, self.max_tokens, self.window,
                                                              self.num_replicas)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.strategy = strategy
        self.drop_last = bool(drop_last)
        self.overflow = overflow
        self.epoch = 0
        self._skip = 0  # batches the next iteration skips (set by load_state_dict)
        self._yielded = 0  # batches of this epoch handed out so far
        self._cache: tuple[tuple[int, int], EpochPlan] | None = None

    def plan(self) -> EpochPlan:
        """The plan of the current epoch (computed on first use, then cached)."""
        return self._plan_for(self.seed, self.epoch)

    def _plan_for(self, seed: int, epoch: int) -> EpochPlan:
        key = (seed, epoch)
        if self._cache is None or self._cache[0] != key:
            rng = np.random.default_rng([seed, epoch]) if self.shuffle else None
            plan = plan_epoch(
                self.lengths,
                self.max_tokens,
                rng=rng,
                strategy=self.strategy,
                window=self.window,
                num_replicas=self.num_replicas,
                drop_last=self.drop_last,
                fallback=self._fallback,
            )
            self._cache = (key, plan)
        return self._cache[1]

    @property
    def dropped_examples(self) -> int:
        return self.plan().dropped_examples

    def set_epoch(self, epoch: int) -> None:
        """Plan `epoch` next. A pending resume (`load_state_dict`) is kept only for that same epoch."""
        check_non_negative_int("epoch", epoch)
        if epoch != self.epoch:
            self._skip = 0
            self._yielded = 0
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (the same on every rank)."""
        return len(self.plan().steps)

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan()
        start, self._skip = self._skip, 0
        self._yielded = start
        for index in plan.steps[start:, self.rank].tolist():
            self._yielded += 1
            yield plan.batch(index)

    def state_dict(self) -> dict:
        """`{"epoch", "seed", "batches_yielded", "num_replicas"}`: enough to resume this epoch.

        `batches_yielded` counts the batches this sampler handed out; a `DataLoader` that prefetches
        takes some before they are trained on: save the number of steps trained instead when they differ.
        """
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "batches_yielded": self._yielded,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields this rank's batches after the first `batches_yielded`.

        Atomic: every value is checked before any is applied; a refused state changes nothing."""
        check_state_keys(state, ("epoch", "seed", "batches_yielded"), self.num_replicas)
        epoch = check_non_negative_int("state['epoch']", state["epoch"])
        seed = check_non_negative_int("state['seed']", state["seed"])
        skip = state["batches_yielded"]
        steps = len(self._plan_for(seed, epoch).steps)
        if not is_int(skip) or not 0 <= skip <= steps:
            raise InputError(f"batches_yielded: expected an int in [0, {steps}], got {skip!r}")
        self.set_epoch(epoch)
        self.seed = seed
        self._skip = self._yielded = int(skip)

    def step_tokens(self) -> np.ndarray:
        """`(steps, num_replicas)` int64 tokens each rank gets at each step of this epoch."""
        plan = self.plan()
        return plan.tokens[plan.steps]

    def rank_imbalance(self) -> float:
        """Largest `(max - min) / max` of a step's tokens over ranks, this epoch (0 = perfectly even)."""
        tokens = self.step_tokens()
        return float(((tokens.max(axis=1) - tokens.min(axis=1)) / tokens.max(axis=1)).max())
