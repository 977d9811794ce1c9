"""Online packing of a stream (`TokenBudgetStream`) against the offline sampler, on the same lengths.

    python benchmarks/stream_fill.py [--quick] [--out benchmarks/results]

The offline `TokenBudgetBatchSampler` sees every length of the epoch before planning; the stream
packer sees `buffer_size` new examples at a time (plus the bins it carries). For the FLAN-like and
OrcaMath-like length distributions of `benchmarks/sampler.py`, budgets of 4k and 16k tokens, 1 and
8 ranks and buffers of 64 … 4096 examples:

- `offline bfd`: `TokenBudgetBatchSampler` (best-fit decreasing, window 4096, epoch 0, seed 0);
- `stream bfd/B`: `TokenBudgetStream(strategy="bfd", buffer_size=B)` over the same lengths in the
  same (shuffled) order;
- `stream greedy/B`: the same buffer filled in arrival order (no sorting): what packing a stream
  "as it comes" gives.

Columns: fill = real tokens / (batches x budget), over all ranks; batches; padding = padding
batches at the end (no targets, to give every rank the same steps); examples/s = stream packing
throughput (reading `{"length": n}` dicts, one process), planning time for the sampler.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from sampler import DISTRIBUTIONS, make_lengths  # noqa: E402

from packcollate.batching.sampler import TokenBudgetBatchSampler  # noqa: E402
from packcollate.batching.stream import TokenBudgetStream  # noqa: E402
from packcollate.tools.bench import library_versions, save_result  # noqa: E402

BUDGETS = (4096, 16384)
RANKS = (1, 8)
BUFFERS = (64, 256, 1024, 4096)


def offline(lengths: np.ndarray, budget: int, ranks: int) -> dict:
    start = time.perf_counter()
    sampler = TokenBudgetBatchSampler(lengths, budget, num_replicas=ranks, rank=0, overflow="own_batch")
    plan = sampler.plan()
    seconds = time.perf_counter() - start
    return {"fill": float(lengths.sum() / (len(plan.tokens) * budget)), "batches": int(len(plan.tokens)),
            "padding": 0, "seconds": seconds, "examples_per_s": len(lengths) / seconds}


def online(lengths: np.ndarray, order: np.ndarray, budget: int, ranks: int, buffer: int, strategy: str) -> dict:
    examples = [{"length": int(n)} for n in lengths[order]]
    stream = TokenBudgetStream(examples, budget, buffer_size=buffer, strategy=strategy, num_replicas=ranks, rank=0,
                               overflow="own_batch", seed=0)
    start = time.perf_counter()
    batches = [batch for step in stream.steps() for batch in step]  # every rank's batches
    seconds = time.perf_counter() - start
    real = [b for b in batches if "labels" not in b[0]]
    tokens = sum(e["length"] for b in real for e in b)
    assert tokens == int(lengths.sum()) and sum(len(b) for b in real) == len(lengths)
    return {"fill": tokens / (len(batches) * budget), "batches": len(batches), "padding": stream.padding_batches,
            "seconds": seconds, "examples_per_s": len(lengths) / seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k examples")
    parser.add_argument("--examples", type=int, default=None, help="examples (default 100,000)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    n = args.examples or (20_000 if args.quick else 100_000)
    rows = []
    print(f"{'lengths':9} {'budget':>6} {'ranks':>5} {'method':18} {'fill':>7} {'batches':>7} {'padding':>7} "
          f"{'examples/s':>11}")
    for name in DISTRIBUTIONS:
        lengths = make_lengths(name, n)
        order = np.random.default_rng(1).permutation(n)  # the stream's order
        for budget in BUDGETS:
            for ranks in RANKS:
                results = {"offline bfd": offline(lengths, budget, ranks)}
                for buffer in BUFFERS:
                    results[f"stream bfd/{buffer}"] = online(lengths, order, budget, ranks, buffer, "bfd")
                results[f"stream greedy/{BUFFERS[-1]}"] = online(lengths, order, budget, ranks, BUFFERS[-1], "greedy")
                for method, r in results.items():
                    rows.append({"distribution": name, "budget": budget, "ranks": ranks, "method": method, **r})
                    print(f"{name:9} {budget:6d} {ranks:5d} {method:18} {r['fill']:7.2%} {r['batches']:7d} "
                          f"{r['padding']:7d} {r['examples_per_s']:11,.0f}", flush=True)
    result = {
        "benchmark": "stream_fill",
        "command": "python benchmarks/stream_fill.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": library_versions("numpy", "torch"),
        "parameters": {"examples": n, "budgets": list(BUDGETS), "ranks": list(RANKS), "buffers": list(BUFFERS),
                       "distributions": {k: dict(zip(("median", "sigma", "clip"), v)) for k, v in DISTRIBUTIONS.items()}},
        "rows": rows,
    }
    save_result(result, args.out / "stream_fill.json")
    return result


if __name__ == "__main__":
    main()
