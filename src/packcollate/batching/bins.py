"""Bins of whole examples within a token budget: packing, equal counts over ranks, and steps.

The machinery `TokenBudgetBatchSampler` (a whole epoch) and `TokenBudgetStream` (a buffer at a time)
share, on example lengths `(n,)` and dataset (or buffer) indices:

- packing (`pack_bins`): examples of at most `max_tokens` tokens go into bins of at most
  `max_tokens` tokens; `"bfd"` and `"ffd"` (`fit_bins`) sort each window of `window` consecutive
  examples by length (descending) and put each example in the fullest bin it fits (best fit) or the
  first bin it fits (first fit); the least-filled bin of every window is packed again with the other
  windows' leftovers, so windows do not each leave a half-empty bin. `"greedy"` (`greedy_bins`)
  fills bins in order and starts a new one when the next example does not fit. A longer example
  gets a bin of its own (not packable). Vectorised: the Python loops run once per item position of a
  window (`fit_bins`) or once per bin (`greedy_bins`), never once per example;
- equal counts (`equal_counts`): give every rank the same number of bins, keeping every example
  exactly once: when the number of bins is not a multiple of `num_replicas`, the least-filled bins
  are repacked into more bins; when too few examples fit the budget for that, the packable bins are
  merged into fewer (or, with `drop_last=True`, the remainder is dropped). `fallback_bins` decides
  up front whether some packing of the lengths can always be equalised (`unequal_counts_error`
  when none can);
- steps (`group_steps`): bins of similar token counts share a step of `num_replicas` bins (one per
  rank), and the steps are shuffled: randomness across steps comes from the shuffle of the examples
  and of the steps, never from sorting.

`Bins` holds bins as contiguous runs of example indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..layout import cumulative

STRATEGIES = ("bfd", "ffd", "greedy")
BUDGET_OVERFLOW_POLICIES = ("error", "own_batch")
DEFAULT_WINDOW = 4096


def check_packing_options(strategy: str, overflow: str) -> None:
    """`InputError` unless `strategy` is one of `STRATEGIES` and `overflow` one of `BUDGET_OVERFLOW_POLICIES`."""
    if strategy not in STRATEGIES:
        raise InputError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if overflow not in BUDGET_OVERFLOW_POLICIES:
        raise InputError(f"overflow: expected one of {BUDGET_OVERFLOW_POLICIES}, got {overflow!r}")


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
    ends = cumulative(lengths)
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
# Bins of examples.


@dataclass
class Bins:
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
        starts = cumulative(self.sizes)[:-1]
        return np.add.reduceat(lengths[self.items], starts) if len(self.sizes) else np.zeros(0, np.int64)

    def runs(self, which: np.ndarray | None = None) -> list[np.ndarray]:
        """The items of each bin of `which` `(c,)` (default: every bin, in order), `(sizes[b],)` each."""
        starts = cumulative(self.sizes)[:-1]
        which = range(len(self.sizes)) if which is None else which
        return [self.items[starts[b] : starts[b] + self.sizes[b]] for b in which]

    def take(self, which: np.ndarray) -> Bins:
        """The bins `which` `(c,)`, `c >= 1`, in that order."""
        return Bins(np.concatenate(self.runs(which)), self.sizes[which], self.packable[which])

    def replace(self, chosen: np.ndarray, items: np.ndarray, sizes: np.ndarray) -> Bins:
        """Drop the bins `chosen` and append new packable bins (`items` grouped by `sizes`)."""
        keep = np.ones(len(self.sizes), dtype=bool)
        keep[chosen] = False
        return Bins(
            np.concatenate([self.items[np.repeat(keep, self.sizes)], items]),
            np.concatenate([self.sizes[keep], sizes]),
            np.concatenate([self.packable[keep], np.ones(len(sizes), dtype=bool)]),
        )


def pack_bins(lengths: np.ndarray, order: np.ndarray, max_tokens: int, strategy: str,
              window: int | None = None) -> Bins:
    """Bins of the examples `order` `(m,)` (indices into `lengths` `(n,)`), taken in this order.

    The examples of at most `max_tokens` tokens are packed by `strategy`: `"bfd"` / `"ffd"` with
    `fit_bins` over windows of `window` examples (None: one window of them all), `"greedy"` with
    `greedy_bins` (no windows). Every longer example gets a bin of its own, not packable, after the
    packed bins, in the order of `order`.
    """
    over = lengths[order] > max_tokens
    fits, oversized = order[~over], order[over]
    if len(fits) == 0:
        bin_of = np.zeros(0, dtype=np.int64)
    elif strategy == "greedy":
        bin_of = greedy_bins(lengths[fits], max_tokens)
    else:
        width = len(fits) if window is None else window
        bin_of = fit_bins(lengths[fits], max_tokens, width, best_fit=strategy == "bfd")
    n_bins = int(bin_of.max(initial=-1)) + 1
    return Bins(
        np.concatenate([fits[np.argsort(bin_of, kind="stable")], oversized]).astype(np.int64, copy=False),
        np.concatenate([np.bincount(bin_of, minlength=n_bins), np.ones(len(oversized), dtype=np.int64)]),
        np.concatenate([np.ones(n_bins, dtype=bool), np.zeros(len(oversized), dtype=bool)]),
    )


# ---------------------------------------------------------------------------------------------------
# Equal counts over ranks.


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


def _merged(bins: Bins, lengths: np.ndarray, capacity: int, remove: int, num_replicas: int) -> Bins | None:
    """`remove` bins fewer, the packable ones repacked within the budget; None when they do not fit
    or fewer than `num_replicas` bins would be left."""
    packable = np.flatnonzero(bins.packable)
    keep = len(packable) - remove
    if remove == 0 or keep < 1 or len(bins.sizes) - remove < num_replicas:
        return None
    pool = np.concatenate(bins.runs(packable))
    items, sizes, tokens = _deal(pool, lengths[pool], keep)
    return None if tokens.max() > capacity else bins.replace(packable, items, sizes)


def equal_counts(
    bins: Bins, lengths: np.ndarray, capacity: int, num_replicas: int, drop_last: bool
) -> tuple[Bins, int] | None:
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
    runs = bins.runs(chosen)
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


def unequal_counts_error(num_replicas: int, n_bins: int, n_examples: int) -> InputError:
    """The error of `n_bins` bins of `n_examples` examples that no repacking makes a multiple of `num_replicas`."""
    return InputError(
        f"num_replicas={num_replicas}: expected a number of batches divisible by it, got {n_bins} batches; "
        f"splitting batches cannot make {-(-n_bins // num_replicas) * num_replicas} out of {n_examples} examples, "
        f"and merging {n_bins % num_replicas} batches away does not fit the budget; use drop_last=True or fewer replicas"
    )


def fallback_bins(lengths: np.ndarray, max_tokens: int, window: int, num_replicas: int) -> Bins | None:
    """Bins of `lengths` `(n,)` that can be made a multiple of `num_replicas` by splitting, independent
    of any shuffle; None when every epoch's own packing can (or `num_replicas == 1`).

    Splitting reaches the next multiple of `num_replicas` unless a packing has more than
    `M = n // num_replicas * num_replicas` bins. No packing here has more than
    `oversized + ceil(2 * tokens / max_tokens) + 2 * windows + 2` (bins more than half full, plus one
    at most half full per window and level of repacking): when that is at most `M`, no epoch needs
    this. Otherwise the examples are best-fit packed longest first (each window gets a stratified
    slice of the lengths), once; an epoch whose own packing cannot be equalised uses these bins.

    Raises InputError (a ValueError) when even they have more than `M` bins: no epoch could give
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
    bins = pack_bins(lengths, np.concatenate([stratified[stratified >= 0], oversized]), max_tokens, "bfd", window)
    if len(bins.sizes) > limit:
        raise unequal_counts_error(num_replicas, len(bins.sizes), n)
    return bins


# ---------------------------------------------------------------------------------------------------
# Steps.


def group_steps(tokens: np.ndarray, num_replicas: int, rng: np.random.Generator | None) -> np.ndarray:
    """`(s, num_replicas)` int64 the bin each rank gets at each step, for bins of `tokens` `(b,)`
    (`b = s * num_replicas`): bins of similar tokens share a step.

    With `rng`: ties in tokens broken at random, then the steps, and the ranks within a step, in
    random order. With `rng=None`: steps in the order their first bin was packed, ranks by bin.
    """
    if rng is not None:
        steps = np.lexsort((rng.random(len(tokens)), tokens)).reshape(-1, num_replicas)
        steps = steps[rng.permutation(len(steps))]
        return np.take_along_axis(steps, rng.random(steps.shape).argsort(axis=1), axis=1)
    steps = np.sort(np.argsort(tokens, kind="stable").reshape(-1, num_replicas), axis=1)
    return steps[np.argsort(steps[:, 0], kind="stable")]
