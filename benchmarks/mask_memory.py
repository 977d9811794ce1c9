"""Peak memory of one train step (forward + backward) of a tiny DeepSeek-V3.2 on one packed 4k-token row:
the packcollate backend's per-bucket masks vs an `N x N` block-causal mask.

    python benchmarks/mask_memory.py                 # CPU, fp32, 4096 tokens

A layer that reads the 4-D mask (the sparse-attention indexer) needs a mask that keeps packed examples
apart. Two ways to hand it one:
- `packcollate` (this repository): every attention layer runs its examples per bucket (one bucket per
  distinct length), each handed one example's causal mask: the mask function builds `(1, 1, L, L)` for
  the longest example `L`, each bucket takes an expanded view `(G, 1, L_b, L_b)`, and the layer's own
  tensors (the indexer's scores, the attention logits) are `G * L_b ** 2` per bucket: memory linear in
  the number of examples;
- `nxn-sdpa`: transformers' sdpa on the same packed row (it detects the packing from `position_ids`
  without a cache and builds the block-causal `(1, 1, N, N)` mask, which the indexer and the attention
  read whole): quadratic in the row.

Each mode runs in its own process; the number is the peak resident memory of that process during the
step minus its resident memory just before (`ru_maxrss`, Linux), with the analytic size of the masks
beside it. Data: FLAN-like lengths (lognormal, median 120, sigma 0.9, clipped to [8, 1024]) drawn until
the row holds 4096 tokens (the last example cut to fit).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

MEDIAN_LENGTH, SIGMA, MIN_LENGTH, MAX_LENGTH = 120, 0.9, 8, 1024
VOCAB = 4096


def row_lengths(tokens: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(np.clip(rng.lognormal(np.log(MEDIAN_LENGTH), SIGMA), MIN_LENGTH, MAX_LENGTH)))
    lengths[-1] -= sum(lengths) - tokens
    return [n for n in lengths if n > 0]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_mode(mode: str, tokens: int, layers: int) -> dict:
    """One forward + backward in this process; peak resident memory above the start of the step."""
    import torch

    import packcollate
    from packcollate import PackedCollator

    sys.path.insert(0, str(Path(__file__).parent))
    from sparse_indexer_step import deepseek_v32_config
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(deepseek_v32_config(layers, 256, 64),
                                             attn_implementation="packcollate" if mode == "packcollate" else "sdpa")
    if mode == "packcollate":
        packcollate.prepare(model)
    lengths = row_lengths(tokens)
    rng = np.random.default_rng(1)
    batch = PackedCollator()([{"input_ids": rng.integers(3, VOCAB, n).tolist()} for n in lengths])
    if mode != "packcollate":  # transformers' own packing detection reads position_ids only
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    before = _rss_bytes()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n, longest = sum(lengths), max(lengths)
    mask_bytes = n * n * 4 if mode != "packcollate" else longest * longest * 4
    return {"mode": mode, "tokens": n, "examples": len(lengths), "longest": longest, "layers": layers,
            "peak_step_bytes": peak - before, "mask_bytes": mask_bytes, "loss": float(loss)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device name>/")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.tokens, args.layers)))
        return {}
    results = {}
    for mode in ("packcollate", "nxn-sdpa"):
        child = subprocess.run([sys.executable, __file__, "--mode", mode, "--tokens", str(args.tokens),
                                "--layers", str(args.layers)], capture_output=True, text=True, check=True)
        results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    first = results["packcollate"]
    print(f"one train step, tiny DeepSeek-V3.2 ({args.layers} layer, hidden 256, indexer top-k 64), one packed row of "
          f"{first['tokens']} tokens ({first['examples']} FLAN-like examples, longest {first['longest']}), CPU fp32")
    print(f"{'mode':12} {'peak step memory':>17} {'mask memory':>12} {'loss':>10}")
    for mode, r in results.items():
        print(f"{mode:12} {r['peak_step_bytes'] / 2**20:14.1f} MiB {r['mask_bytes'] / 2**20:9.1f} MiB {r['loss']:10.6f}")
    ratio = results["packcollate"]["peak_step_bytes"] / results["nxn-sdpa"]["peak_step_bytes"]
    print(f"packcollate / N x N: {ratio:.2f}x peak step memory")
    device_name = f"cpu-{platform.machine()}"
    out = {"benchmark": "mask_memory", "device": device_name, "dtype": "fp32",
           "command": "python benchmarks/mask_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "modes": results, "packcollate_vs_nxn_peak": ratio}
    path = (args.out or Path("benchmarks/results") / device_name) / "mask_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
