"""Token-budget batch sampler: batches of whole examples whose lengths sum to at most `max_tokens`.

With padding-free batches the cost of a step is its number of tokens, not its number of examples.
`TokenBudgetBatchSampler` picks which examples share a step so that every step is close to the
budget, and hands each data-parallel rank its own batches:

    sampler = TokenBudgetBatchSampler(dataset["length"], max_tokens=16384)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PackedCollator())

How an epoch is planned (once per epoch, lazily, then cached, so `len()` and iteration agree):

1. shuffle the example indices with a generator seeded by `(seed, epoch)` (dataset order when
   `shuffle=False`);
2. pack them into bins of at most `max_tokens` tokens: `"bfd"` and `"ffd"` sort each window of
   `window` consecutive examples by length (descending) and put each example in the fullest bin it
   fits (best fit) or the first bin it fits (first fit); the least-filled bin of every window is
   packed again with the other windows' leftovers, so windows do not each leave a half-empty bin.
   `"greedy"` fills bins in order and starts a new one when the next example does not fit;
3. give every rank the same number of bins, keeping every example exactly once (below);
4. group bins of similar token counts into steps of `num_replicas` bins (one per rank) and shuffle
   the steps: randomness across steps comes from steps 1 and 4, never from sorting the epoch.

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
import torch
from torch.utils.data import Sampler

from .lengths import as_lengths

STRATEGIES = ("bfd", "ffd", "greedy")
OVERFLOW_POLICIES = ("error", "own_batch")
DEFAULT_WINDOW = 4096


def _check_state_keys(state: dict, keys: tuple[str, ...], num_replicas: int) -> None:
    """A resume state carries `keys` and, when it names one, this plan's `num_replicas` (the plan
    depends on it); shared by the sampler and the stream packer."""
    if set(keys) - set(state):
        raise ValueError(f"state: expected the keys {', '.join(keys)}, got {sorted(state)}")
    if state.get("num_replicas", num_replicas) != num_replicas:
        raise ValueError(
            f"state: expected num_replicas={num_replicas} (the plan depends on it), "
            f"got a state saved with {state['num_replicas']}"
        )


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return int(value)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# Packing: every function maps items `(m,)` (lengths, all <= capacity) to a bin id `(m,)`, bins
# numbered 0 … k-1 in the order they were opened.


def _space_dtype(capacity: int) -> tuple[np.dtype, np.dtype]:
    """The narrowest signed dtype holding `±capacity`, and its unsigned twin."""
    for signed, unsigned in ((np.int16, np.uint16), (np.int32, np.uint32)):
        if capacity < np.iinfo(signed).max:
            return np.dtype(signed), np.dtype(unsigned)
    return np.dtype(np.int64), np.dtype(np.uint64)


def _fit_windows(sorted_lengths: np.ndarray, capacity: int, best_fit: bool) -> np.ndarray:
    """Best- or first-fit of `(w, width)` windows, each row sorted descending (0 = no item).

    Returns `(w, width)` the bin (within its window) of each item. All windows advance together:
    one vector step per item position, so the Python loop runs `width` times, not once per item.
    Best fit is the argmin of `space - length` read as unsigned (a negative difference, a bin that
    is too full, wraps to a huge number); first fit is the first bin with `space >= length`.
    Unopened bins hold `capacity`, so ties pick the lowest bin: opened bins first, in order.
    """
    signed, unsigned = _space_dtype(capacity)
    n_windows, width = sorted_lengths.shape
    columns = np.ascontiguousarray(sorted_lengths.T, dtype=signed)  # (width, w)
    space = np.full((n_windows, width), capacity, dtype=signed)
    bins = np.zeros((width, n_windows), dtype=np.intp)
    rows = np.arange(n_windows)
    opened = 1  # bins 0 … opened-1 are searched; at least one of them is still empty
    for j in range(width):
        need = columns[j]  # 0 for the padding of the last window: fits anywhere, changes nothing
        search = space[:, :opened]
        if best_fit:
            chosen = (search - need[:, None]).view(unsigned).argmin(axis=1)
        else:
            chosen = (search >= need[:, None]).argmax(axis=1)
        space[rows, chosen] -= need
        bins[j] = chosen
        top = int(chosen.max()) + 2
        if top > opened:
            opened = min(top, width)
    return bins.T


def _dense(ids: np.ndarray) -> np.ndarray:
    """Renumber non-negative ids `(m,)` to 0 … k-1, keeping their order."""
    used = np.zeros(int(ids.max()) + 1, dtype=bool)
    used[ids] = True
    return (np.cumsum(used) - 1)[ids]


def fit_bins(lengths: np.ndarray, capacity: int, window: int, best_fit: bool) -> np.ndarray:
    """Bin `(m,)` of each item of `lengths` `(m,)`: best/first-fit decreasing within windows.

    The items of each window's least-filled bin (windows with two bins or more) are packed again,
    together, the same way, so the epoch ends with about one part-filled bin instead of one per window.
    """
    m = len(lengths)
    width = min(window, m)
    n_windows = -(-m // width)
    grid = np.zeros(n_windows * width, dtype=np.int64)
    grid[:m] = lengths
    grid = grid.reshape(n_windows, width)
    descending = np.argsort(-grid, axis=1, kind="stable")
    slots = _fit_windows(np.take_along_axis(grid, descending, axis=1), capacity, best_fit)
    local = np.empty_like(slots)
    np.put_along_axis(local, descending, slots, axis=1)
    ids = (local + np.arange(n_windows)[:, None] * width).reshape(-1)[:m]
    if n_windows > 1:
        sizes = np.bincount(ids, minlength=n_windows * width).reshape(n_windows, width)
        tokens = np.bincount(ids, lengths, minlength=n_windows * width).reshape(n_windows, width)
        several = (sizes > 0).sum(axis=1) >= 2
        least = np.where(sizes > 0, tokens, np.inf).argmin(axis=1) + np.arange(n_windows) * width
        leftover = np.zeros(n_windows * width, dtype=bool)
        leftover[least[several]] = True
        again = leftover[ids]
        if again.any():
            ids[again] = n_windows * width + fit_bins(lengths[again], capacity, window, best_fit)
    return _dense(ids)


def greedy_bins(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Bin `(m,)` of each item: fill bins in order, open a new one when the next item does not fit.

    `next_start[i]`, the first item of the bin after a bin starting at item `i`, comes from one
    `searchsorted` over the cumulative lengths; the loop then only hops from bin to bin.
    """
    ends = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ends[1:])
    next_start = (np.searchsorted(ends, ends[:-1] + capacity, side="right") - 1).tolist()
    starts = []
    i = 0
    while i < len(lengths):
        starts.append(i)
        i = next_start[i]
    first = np.zeros(len(lengths), dtype=np.int64)
    first[starts] = 1
    return np.cumsum(first) - 1


# ---------------------------------------------------------------------------------------------------
# Equal counts over ranks.


@dataclass
class _Bins:
    """Bins as contiguous runs of `items`.

    Attributes:
        items: `(k,)` int64 dataset indices, bin after bin.
        sizes: `(b,)` int64 number of examples of each bin.
        packable: `(b,)` bool, False for the own batch of an example longer than the budget.
    """

    items: np.ndarray
    sizes: np.ndarray
    packable: np.ndarray

    def tokens(self, lengths: np.ndarray) -> np.ndarray:
        """`(b,)` int64 tokens of each bin."""
        starts = np.cumsum(self.sizes) - self.sizes
        return np.add.reduceat(lengths[self.items], starts) if len(self.sizes) else np.zeros(0, np.int64)

    def replace(self, chosen: np.ndarray, items: np.ndarray, sizes: np.ndarray) -> _Bins:
        """Drop the bins `chosen` and append new packable bins (`items` grouped by `sizes`)."""
        keep = np.ones(len(self.sizes), dtype=bool)
        keep[chosen] = False
        return _Bins(
            np.concatenate([self.items[np.repeat(keep, self.sizes)], items]),
            np.concatenate([self.sizes[keep], sizes]),
            np.concatenate([self.packable[keep], np.ones(len(sizes), dtype=bool)]),
        )


def _deal(items: np.ndarray, item_lengths: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deal `items` `(m,)` (m >= n_bins) to `n_bins` bins of nearly equal tokens.

    Longest first, `n_bins` items a round: the round's longest item goes to the lightest bin, its
    next to the next lightest, … (longest-processing-time scheduling, one vector step per round).
    Returns the items grouped by bin, the bin sizes and the bin tokens `(n_bins,)`.
    """
    descending = np.argsort(-item_lengths, kind="stable")
    loads = np.zeros(n_bins, dtype=np.int64)
    bin_of = np.empty(len(items), dtype=np.int64)
    for start in range(0, len(items), n_bins):
        deal = descending[start : start + n_bins]
        lightest = np.argsort(loads, kind="stable")[: len(deal)]
        bin_of[deal] = lightest
        loads[lightest] += item_lengths[deal]
    grouped = np.argsort(bin_of, kind="stable")
    return items[grouped], np.bincount(bin_of, minlength=n_bins), loads


def _split_halves(runs: list[np.ndarray], lengths: np.ndarray, splits: int) -> list[np.ndarray]:
    """Split the fullest run of two items or more at its token midpoint, `splits` times."""
    runs = list(runs)
    for _ in range(splits):
        tokens = [int(lengths[run].sum()) if len(run) > 1 else -1 for run in runs]
        fullest = int(np.argmax(tokens))
        run = runs.pop(fullest)
        cut = int(np.searchsorted(np.cumsum(lengths[run]), tokens[fullest] / 2))
        cut = min(max(cut, 1), len(run) - 1)
        runs += [run[:cut], run[cut:]]
    return runs


def _merged(bins: _Bins, lengths: np.ndarray, capacity: int, remove: int, num_replicas: int) -> _Bins | None:
    """`remove` bins fewer, the packable ones repacked within the budget; None when they do not fit
    or fewer than `num_replicas` bins would be left."""
    packable = np.flatnonzero(bins.packable)
    keep = len(packable) - remove
    if remove == 0 or keep < 1 or len(bins.sizes) - remove < num_replicas:
        return None
    starts = np.cumsum(bins.sizes) - bins.sizes
    pool = np.concatenate([bins.items[starts[b] : starts[b] + bins.sizes[b]] for b in packable])
    items, sizes, tokens = _deal(pool, lengths[pool], keep)
    return None if tokens.max() > capacity else bins.replace(packable, items, sizes)


def _equal_counts(
    bins: _Bins, lengths: np.ndarray, capacity: int, num_replicas: int, drop_last: bool
) -> tuple[_Bins, int] | None:
    """Make the number of bins a multiple of `num_replicas`, each example kept exactly once.

    The `s + num_replicas` least-filled packable bins (`s` = bins past the last full step) are
    repacked into `2 * num_replicas` bins (`num_replicas` when `s == 0`) of nearly equal tokens;
    where that would exceed the budget, the fullest of them are split in two instead. When too few
    examples fit the budget to split, the packable bins are merged into `s` fewer instead. With
    `drop_last`, the `s` least-filled bins are dropped first (with fewer bins than `num_replicas`,
    none: they are split up to `num_replicas`, which `n >= num_replicas` examples always allow).
    Returns the bins and the number of examples dropped, or None when neither splitting nor merging
    reaches a multiple of `num_replicas`.
    """
    if num_replicas == 1:
        return bins, 0
    dropped = 0
    remainder = len(bins.sizes) % num_replicas
    if remainder and drop_last and remainder < len(bins.sizes):
        chosen = np.argsort(bins.tokens(lengths), kind="stable")[:remainder]
        dropped = int(bins.sizes[chosen].sum())
        bins = bins.replace(chosen, np.zeros(0, np.int64), np.zeros(0, np.int64))
        remainder = 0
    extra = -remainder % num_replicas
    packable = np.flatnonzero(bins.packable)
    packable = packable[np.argsort(bins.tokens(lengths)[packable], kind="stable")]
    chosen = packable[: remainder + num_replicas]
    if bins.sizes[chosen].sum() < len(chosen) + extra:
        chosen = packable
    target = len(chosen) + extra
    available = int(bins.sizes[chosen].sum())
    if available < target:
        merged = _merged(bins, lengths, capacity, remainder, num_replicas)
        return None if merged is None else (merged, dropped)
    starts = np.cumsum(bins.sizes) - bins.sizes
    runs = [bins.items[starts[b] : starts[b] + bins.sizes[b]] for b in chosen]
    pool = np.concatenate(runs) if runs else np.zeros(0, np.int64)
    if len(pool) == 0:
        return bins, dropped
    items, sizes, tokens = _deal(pool, lengths[pool], target)
    if tokens.max() > capacity:
        if not extra:
            return bins, dropped
        runs = _split_halves(runs, lengths, extra)
        items, sizes = np.concatenate(runs), np.array([len(run) for run in runs], dtype=np.int64)
    return bins.replace(chosen, items, sizes), dropped


def _unequal_error(num_replicas: int, n_bins: int, n_examples: int) -> ValueError:
    return ValueError(
        f"num_replicas={num_replicas}: expected a number of batches divisible by it, got {n_bins} batches; "
        f"splitting batches cannot make {-(-n_bins // num_replicas) * num_replicas} out of {n_examples} examples, "
        f"and merging {n_bins % num_replicas} batches away does not fit the budget; use drop_last=True or fewer replicas"
    )


def _bins_of(lengths: np.ndarray, fits: np.ndarray, oversized: np.ndarray, max_tokens: int, strategy: str,
             window: int) -> _Bins:
    """Pack the examples `fits` (in this order) into bins; every one of `oversized` gets its own."""
    if len(fits) == 0:
        bin_of = np.zeros(0, dtype=np.int64)
    elif strategy == "greedy":
        bin_of = greedy_bins(lengths[fits], max_tokens)
    else:
        bin_of = fit_bins(lengths[fits], max_tokens, window, best_fit=strategy == "bfd")
    return _Bins(
        np.concatenate([fits[np.argsort(bin_of, kind="stable")], oversized]),
        np.concatenate([np.bincount(bin_of), np.ones(len(oversized), dtype=np.int64)]),
        np.concatenate([np.ones(int(bin_of.max(initial=-1)) + 1, dtype=bool), np.zeros(len(oversized), dtype=bool)]),
    )


def fallback_bins(lengths: np.ndarray, max_tokens: int, window: int, num_replicas: int) -> _Bins | None:
    """Bins that can be made a multiple of `num_replicas` by splitting, independent of any shuffle;
    None when every epoch's own packing can (or `num_replicas == 1`).

    Splitting reaches the next multiple of `num_replicas` unless a packing has more than
    `M = n // num_replicas * num_replicas` bins. No packing here has more than
    `oversized + ceil(2 * tokens / max_tokens) + 2 * windows + 2` (bins more than half full, plus one
    at most half full per window and level of repacking): when that is at most `M`, no epoch needs
    this. Otherwise the examples are best-fit packed longest first (each window gets a stratified
    slice of the lengths), once; an epoch whose own packing cannot be equalised uses these bins.

    Raises ValueError when even they have more than `M` bins: no epoch of this sampler could give
    every rank the same number of batches (decided here, up front, not at some later epoch).
    """
    n = len(lengths)
    limit = n // num_replicas * num_replicas
    fits = np.flatnonzero(lengths <= max_tokens)
    oversized = np.flatnonzero(lengths > max_tokens)
    bound = len(oversized) + -(-2 * int(lengths[fits].sum()) // max_tokens) + 2 * -(-len(fits) // window) + 2
    if num_replicas == 1 or bound <= limit:
        return None
    window = max(window, min(len(fits), DEFAULT_WINDOW))  # the fallback packs tighter than small windows
    descending = fits[np.argsort(-lengths[fits], kind="stable")]
    windows = -(-len(descending) // window)
    stratified = np.full(windows * window, -1, dtype=np.int64)
    stratified[: len(descending)] = descending
    stratified = stratified.reshape(window, windows).T.reshape(-1)
    bins = _bins_of(lengths, stratified[stratified >= 0], oversized, max_tokens, "bfd", window)
    if len(bins.sizes) > limit:
        raise _unequal_error(num_replicas, len(bins.sizes), n)
    return bins


# ---------------------------------------------------------------------------------------------------


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
    fallback: _Bins | None = None,
) -> EpochPlan:
    """Plan one epoch (see the module docstring); `rng=None` keeps the dataset order (no shuffling).

    `fallback` (`fallback_bins`): bins to use when this epoch's own cannot be equalised over ranks.
    """
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    over = lengths[order] > max_tokens
    bins = _bins_of(lengths, order[~over], order[over], max_tokens, strategy, window)
    equal = _equal_counts(bins, lengths, max_tokens, num_replicas, drop_last)
    if equal is None and fallback is not None:
        equal = _equal_counts(fallback, lengths, max_tokens, num_replicas, drop_last)
    if equal is None:
        raise _unequal_error(num_replicas, len(bins.sizes), len(lengths))
    bins, dropped = equal
    tokens = bins.tokens(lengths)
    if rng is not None:  # similar bins share a step; steps, and ranks within a step, in random order
        steps = np.lexsort((rng.random(len(tokens)), tokens)).reshape(-1, num_replicas)
        steps = steps[rng.permutation(len(steps))]
        steps = np.take_along_axis(steps, rng.random(steps.shape).argsort(axis=1), axis=1)
    else:  # similar bins share a step; steps in the order their first bin was packed
        steps = np.sort(np.argsort(tokens, kind="stable").reshape(-1, num_replicas), axis=1)
        steps = steps[np.argsort(steps[:, 0], kind="stable")]
    bounds = np.zeros(len(bins.sizes) + 1, dtype=np.int64)
    np.cumsum(bins.sizes, out=bounds[1:])
    return EpochPlan(bins.items, bounds, tokens, steps, dropped)


def _distributed_default(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialized else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    num_replicas = _positive_int("num_replicas", num_replicas)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank: expected an int in [0, num_replicas={num_replicas}), got {rank!r}")
    return num_replicas, int(rank)


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
        self.max_tokens = _positive_int("max_tokens", max_tokens)
        self.window = _positive_int("window", window)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow: expected one of {OVERFLOW_POLICIES}, got {overflow!r}")
        _non_negative_int("seed", seed)
        self.num_replicas, self.rank = _distributed_default(num_replicas, rank)
        if len(self.lengths) < self.num_replicas:
            raise ValueError(
                f"num_replicas={self.num_replicas}: expected at least that many examples so that every rank "
                f"gets a batch, got {len(self.lengths)}"
            )
        over = np.flatnonzero(self.lengths > self.max_tokens)
        if len(over) and overflow == "error":
            i = int(over[0])
            raise ValueError(
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
        _non_negative_int("epoch", epoch)
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
        _check_state_keys(state, ("epoch", "seed", "batches_yielded"), self.num_replicas)
        epoch = _non_negative_int("state['epoch']", state["epoch"])
        seed = _non_negative_int("state['seed']", state["seed"])
        skip = state["batches_yielded"]
        steps = len(self._plan_for(seed, epoch).steps)
        if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or not 0 <= skip <= steps:
            raise ValueError(f"batches_yielded: expected an int in [0, {steps}], got {skip!r}")
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
