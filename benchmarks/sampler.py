"""Token-budget sampler: fill, tokens per step, rank balance and planning time, against the baselines.

    python benchmarks/sampler.py [--quick] [--out benchmarks/results]

For two length distributions and budgets of 4k, 16k and 64k tokens per rank and step:

- `bfd`, `ffd`, `greedy`: `TokenBudgetBatchSampler` with 8 simulated ranks (epoch 0, seed 0);
- `fixed bs=B`: a fixed number of examples per step, flattened into one row as `PackedCollator`
  does (a step's tokens are the sum of its lengths), with B = budget / mean length so that the mean
  tokens per step is about the budget; steps above the budget are what it cannot promise;
- `trl bfd`: TRL's offline `pack_dataset(dataset, seq_length=budget, strategy="bfd")` on a
  `datasets.Dataset` of token lists with the same lengths (when trl is importable). It moves the
  tokens too (Arrow copies), so its time is not planning alone; it packs within each `map` batch
  (1000 examples by default, what users get) and the result is fixed for every epoch. Its rows are
  shuffled and dealt to the 8 ranks, as a `Trainer` would.

Columns: fill = real tokens / (batches x budget); tokens per step (one rank's batch) min / median /
max; over = steps above the budget; imbalance = (max - min) / max of a step's tokens over the 8
ranks, the largest and the mean over steps; plan = median wall time to build the sampler and plan
an epoch of `--examples` examples.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from packcollate.batching.bins import DEFAULT_WINDOW, STRATEGIES
from packcollate.batching.sampler import TokenBudgetBatchSampler
from packcollate.tools.bench import library_versions, save_result

# name -> (median, sigma, max) of a lognormal length distribution, rounded and clipped to [1, max].
DISTRIBUTIONS = {
    # FLAN-style instruction mixes: many short tasks (classification, short QA) and a long tail of
    # few-shot / long-context ones; median ~120 tokens, wide spread, clipped at 1024.
    "flan": (120, 0.9, 1024),
    # OrcaMath-200k-style data (not measured here, no network): a grade-school word problem
    # (~60-100 tokens) plus a step-by-step solution (~100-300 tokens), so longer and narrower than
    # FLAN: median ~250, sigma 0.5 (the middle half ~180-350 tokens), clipped at a 2048 max_seq_length.
    "orcamath": (250, 0.5, 2048),
}
BUDGETS = (4096, 16384, 65536)
RANKS = 8


def make_lengths(name: str, n: int, seed: int = 0) -> np.ndarray:
    median, sigma, clip = DISTRIBUTIONS[name]
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, clip).astype(np.int64)


def step_stats(tokens: np.ndarray, budget: int) -> dict:
    """Statistics of `(steps, ranks)` tokens per rank and step."""
    imbalance = (tokens.max(axis=1) - tokens.min(axis=1)) / tokens.max(axis=1)
    return {
        "batches": int(tokens.size),
        "fill": float(tokens.sum() / (tokens.size * budget)),
        "tokens_min": int(tokens.min()),
        "tokens_median": float(np.median(tokens)),
        "tokens_max": int(tokens.max()),
        "over_budget": float((tokens > budget).mean()),
        "imbalance_max": float(imbalance.max()),
        "imbalance_mean": float(imbalance.mean()),
    }


def ours(lengths: np.ndarray, budget: int, strategy: str, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampler = TokenBudgetBatchSampler(lengths, budget, strategy=strategy, num_replicas=RANKS, rank=0)
        len(sampler)
        times.append(time.perf_counter() - start)
    return {**step_stats(sampler.step_tokens(), budget), "plan_s": float(np.median(times)), "examples": len(lengths)}


def fixed_batch_size(lengths: np.ndarray, budget: int) -> dict:
    """Shuffled examples, `round(budget / mean length)` per step, flattened: tokens = sum of lengths."""
    batch_size = max(1, round(budget / lengths.mean()))
    shuffled = np.random.default_rng(0).permutation(lengths)
    steps = len(lengths) // (batch_size * RANKS)  # drop_last, as a DistributedSampler + DataLoader would
    tokens = shuffled[: steps * batch_size * RANKS].reshape(steps, RANKS, batch_size).sum(axis=2)
    return {**step_stats(tokens, budget), "plan_s": None, "examples": len(lengths), "batch_size": batch_size}


def trl_bfd(lengths: np.ndarray, budget: int) -> dict:
    """TRL's `pack_dataset` (BFD) on a Dataset of zero token lists of the given lengths."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    from trl.data_utils import pack_dataset

    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(offsets[-1], dtype=np.int32)))
    dataset = datasets.Dataset(pa.table({"input_ids": column}))
    start = time.perf_counter()
    packed = pack_dataset(dataset, seq_length=budget, strategy="bfd")
    elapsed = time.perf_counter() - start
    rows = np.asarray(pc.list_value_length(packed.data.column("input_ids").combine_chunks()), dtype=np.int64)
    assert rows.sum() == lengths.sum(), "trl dropped or truncated tokens"
    steps = len(rows) // RANKS  # rows shuffled and dealt to 8 ranks, as a Trainer's DistributedSampler would
    dealt = np.random.default_rng(0).permutation(rows)[: steps * RANKS]
    stats = step_stats(dealt.reshape(steps, RANKS), budget)
    stats["fill"] = float(rows.sum() / (len(rows) * budget))  # over every packed row, none dropped
    stats["batches"] = len(rows)
    return {**stats, "plan_s": elapsed, "examples": len(lengths)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k examples, one timing run, TRL on 20k")
    parser.add_argument("--examples", type=int, default=None, help="examples per epoch (default 1,000,000)")
    parser.add_argument("--repeats", type=int, default=None, help="planning runs, median reported (default 3)")
    parser.add_argument("--trl-examples", type=int, default=None, help="examples given to TRL (default 200,000)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    n = args.examples or (100_000 if args.quick else 1_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    n_trl = min(n, args.trl_examples or (20_000 if args.quick else 200_000))
    torch.set_num_threads(1)
    try:
        import datasets

        datasets.disable_progress_bars()
        import trl.data_utils  # noqa: F401

        have_trl = True
    except ImportError:
        print("trl or datasets not installed: the trl rows are skipped", file=sys.stderr)
        have_trl = False

    rows = []
    for name in DISTRIBUTIONS:
        lengths = make_lengths(name, n)
        for budget in BUDGETS:
            results = {strategy: ours(lengths, budget, strategy, repeats) for strategy in STRATEGIES}
            fixed = fixed_batch_size(lengths, budget)
            results[f"fixed bs={fixed['batch_size']}"] = fixed
            if have_trl:
                results["trl bfd"] = trl_bfd(lengths[:n_trl], budget)
            for method, result in results.items():
                rows.append({"distribution": name, "budget": budget, "method": method, **result})
            print_rows(rows[-len(results):], header=len(rows) == len(results))

    result = {
        "benchmark": "sampler",
        "command": "python benchmarks/sampler.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": library_versions("numpy", "torch", "trl", "datasets"),
        "parameters": {
            "examples": n,
            "trl_examples": n_trl if have_trl else None,
            "repeats": repeats,
            "ranks": RANKS,
            "budgets": list(BUDGETS),
            "distributions": {k: dict(zip(("median", "sigma", "clip"), v)) for k, v in DISTRIBUTIONS.items()},
            "sampler": {"seed": 0, "epoch": 0, "window": DEFAULT_WINDOW},
        },
        "rows": rows,
    }
    save_result(result, args.out / "sampler.json")
    return result


def print_rows(rows: list[dict], header: bool) -> None:
    if header:
        print(
            f"{'lengths':9} {'budget':>6} {'method':13} {'examples':>9} {'fill':>7} "
            f"{'tok min':>7} {'median':>7} {'max':>7} {'over':>6} {'imb max':>7} {'mean':>6} {'plan s':>7}"
        )
    for r in rows:
        plan = f"{r['plan_s']:7.2f}" if r["plan_s"] is not None else f"{'-':>7}"
        print(
            f"{r['distribution']:9} {r['budget']:6d} {r['method']:13} {r['examples']:9d} {r['fill']:7.2%} "
            f"{r['tokens_min']:7d} {r['tokens_median']:7.0f} {r['tokens_max']:7d} {r['over_budget']:6.1%} "
            f"{r['imbalance_max']:7.3f} {r['imbalance_mean']:6.3f} {plan}"
        )



if __name__ == "__main__":
    main()
