"""Collator throughput: packcollate vs transformers vs TRL vs the physical floor, side by side.

    python benchmarks/collate_speed.py [--repeats 30] [--out benchmarks/results]

Shapes are `examples x mean length` with lognormal lengths (sigma 0.8). Inputs are lists of token
ids (what `datasets` yields) or numpy arrays. The floor is `np.concatenate` of the input ids alone:
no labels, no positions, no validation. Contenders run round-robin in every repeat so machine noise
hits all of them alike; the table shows median M tokens/s and ratios.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from packcollate import PackedCollator
from packcollate.tools.bench import library_versions, save_result

SHAPES = [(8, 256), (64, 512), (256, 256)]
SIGMA = 0.8


def make_features(n_examples: int, mean_length: int, kind: str, seed: int = 0) -> list[dict]:
    """`n_examples` dicts of lognormal-length random ids, as lists or numpy arrays."""
    rng = np.random.default_rng(seed)
    # lognormal mean = exp(mu + sigma^2 / 2): choose mu so the mean length is `mean_length`
    mu = np.log(mean_length) - SIGMA**2 / 2
    lengths = np.clip(rng.lognormal(mu, SIGMA, n_examples).astype(int), 2, None)
    ids = [rng.integers(0, 32000, n, dtype=np.int64) for n in lengths]
    return [{"input_ids": x.tolist() if kind == "list" else x} for x in ids]


def contenders() -> dict:
    """name -> callable(features); HF and TRL only when importable."""
    ours = PackedCollator()
    out = {"packcollate": ours, "floor (np.concatenate)": lambda f: np.concatenate([x["input_ids"] for x in f])}
    try:
        from transformers import DataCollatorWithFlattening

        out["transformers"] = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass
    try:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        out["trl"] = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    except ImportError:
        print("trl not installed: its column is skipped", file=sys.stderr)
    return out


def measure(features: list[dict], fns: dict, repeats: int, block_s: float = 0.01) -> dict[str, float]:
    """Median M tokens/s of each contender, run round-robin.

    One sample times a block of calls lasting about `block_s` (sized during warm-up), so timer
    resolution and one-off interruptions weigh less on the fast contenders.
    """
    n_tokens = sum(len(f["input_ids"]) for f in features)
    calls = {}
    for name, fn in fns.items():  # warm-up and block sizing
        start = time.perf_counter()
        fn(features)
        calls[name] = max(1, int(block_s / max(time.perf_counter() - start, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn(features)
            times[name].append((time.perf_counter() - start) / calls[name])
    return {name: n_tokens / float(np.median(t)) / 1e6 for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fns = contenders()
    rows = []
    for kind in ("list", "numpy"):
        for n, mean in SHAPES:
            rates = measure(make_features(n, mean, kind), fns, args.repeats)
            rows.append({"input": kind, "shape": f"{n}x{mean}", "M_tokens_per_s": rates})

    names = list(fns)
    header = f"{'input':6} {'shape':8} " + " ".join(f"{n[:12]:>12}" for n in names)
    header += "  ours/HF  ours/TRL  floor/ours"
    print("median M tokens/s (higher is better)")
    print(header)
    for row in rows:
        r = row["M_tokens_per_s"]
        ours = r["packcollate"]
        ratios = {
            "vs_transformers": ours / r["transformers"] if "transformers" in r else None,
            "vs_trl": ours / r["trl"] if "trl" in r else None,
            "floor_over_ours": r["floor (np.concatenate)"] / ours,
        }
        row["ratios"] = ratios
        fmt = lambda x: f"{x:8.1f}x" if x is not None else "      n/a"  # noqa: E731
        print(
            f"{row['input']:6} {row['shape']:8} " + " ".join(f"{r[n]:12.1f}" for n in names)
            + f" {fmt(ratios['vs_transformers'])} {fmt(ratios['vs_trl'])} {ratios['floor_over_ours']:9.2f}x"
        )
    result = {
        "benchmark": "collate_speed",
        "command": "python benchmarks/collate_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "versions": library_versions("numpy", "torch", "transformers", "trl"),
        "lengths": f"lognormal, sigma {SIGMA}, mean as in shape",
        "repeats": args.repeats,
        "rows": rows,
    }
    save_result(result, args.out / "collate_speed.json")
    return result



if __name__ == "__main__":
    main()
