"""One training step (forward + backward + AdamW) of a tiny DeepSeek-V3.2 (sparse-attention indexer),
padded vs packed, side by side.

    python benchmarks/sparse_indexer_step.py                 # CPU, fp32

Modes, on the same batches in the same order:
- `padded-sdpa`: `PaddedCollator` (right padding, attention_mask), transformers' sdpa (the indexer's
  top-k folded into its 4-D mask);
- `packcollate`: `PackedCollator` + `attn_implementation="packcollate"` + `packcollate.prepare`: every
  attention layer runs its examples apart, one bucket per distinct length, each handed one example's
  causal mask (its indexer selects inside the example; `backend/restart.py`).

Data: batches of 16 examples with FLAN-like lengths (lognormal, median 120 tokens, sigma 0.9, clipped to
[8, 1024]), as benchmarks/attention_step.py. Model: DeepSeek-V3.2-shaped, 4 layers, hidden 256, 8 heads,
MLA (q rank 128, kv rank 64, rope 16 / nope 32 / v 32), indexer 4 heads of 32 with top-k 64 (so the
selection bites at these lengths), dense MLP (no experts), vocabulary 4096. The table shows real (non-pad)
tokens/s, the median step, the speed-up over padded, and the ideal speed-up (padded / real tokens).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import numpy as np
import torch

import packcollate
from packcollate import PackedCollator, PaddedCollator
from packcollate.tools.bench import (
    library_versions,
    round_robin_summary,
    save_result,
    time_round_robin,
)

MEDIAN_LENGTH, SIGMA, MIN_LENGTH, MAX_LENGTH = 120, 0.9, 8, 1024
VOCAB = 4096


def flan_like_batches(n_batches: int, batch_size: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        lengths = np.clip(rng.lognormal(np.log(MEDIAN_LENGTH), SIGMA, batch_size), MIN_LENGTH, MAX_LENGTH).astype(int)
        batches.append([{"input_ids": rng.integers(3, VOCAB, n).tolist()} for n in lengths])
    return batches


def deepseek_v32_config(layers: int, hidden: int, topk: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "deepseek_v32", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
        moe_intermediate_size=hidden, num_hidden_layers=layers, first_k_dense_replace=layers,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, index_n_heads=4, index_head_dim=32, index_topk=topk,
        max_position_embeddings=2048, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, each timed --repeats times")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device name>/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    device = torch.device("cpu")
    device_name = f"cpu-{platform.machine()}"
    batches = flan_like_batches(args.batches, args.batch_size)
    real_tokens = [sum(len(f["input_ids"]) for f in b) for b in batches]
    padded_tokens = [len(b) * max(len(f["input_ids"]) for f in b) for b in batches]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(deepseek_v32_config(args.layers, args.hidden, args.topk),
                                            attn_implementation="sdpa")
    runs = {}
    for name, collator, implementation in (("padded-sdpa", PaddedCollator(), "sdpa"),
                                           ("packcollate", PackedCollator(), "packcollate")):
        model = copy.deepcopy(base)
        model.set_attn_implementation(implementation)
        if implementation == "packcollate":
            packcollate.prepare(model)
        model.train()
        runs[name] = {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-4),
                      "batches": [collator(b) for b in batches]}
    time_round_robin(runs, args.repeats, device)
    ideal = sum(padded_tokens) / sum(real_tokens)
    results = round_robin_summary(runs, sum(real_tokens))
    padded = results["padded-sdpa"]["tokens_per_s"]
    for r in results.values():
        r["speedup_vs_padded"] = r["tokens_per_s"] / padded

    print(f"train step, tiny DeepSeek-V3.2 ({args.layers} layers, hidden {args.hidden}, indexer top-k {args.topk}, "
          f"vocab {VOCAB}), {args.batch_size} FLAN-like examples per step, {device_name}, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{'mode':14} {'real tok/s':>11} {'median step':>12} {'vs padded':>10} {'first loss':>11}")
    for name, r in results.items():
        print(f"{name:14} {r['tokens_per_s']:11.0f} {r['median_step_s'] * 1e3:10.1f}ms {r['speedup_vs_padded']:9.2f}x "
              f"{r['first_loss']:11.6f}")
    print(f"{'ideal (padded/real tokens)':26} {ideal:19.2f}x")
    losses = [r["first_loss"] for r in results.values()]
    print(f"same first-step loss across modes: max difference {max(losses) - min(losses):.2e}")

    out = {
        "benchmark": "sparse_indexer_step",
        "device": device_name,
        "dtype": "fp32",
        "threads": torch.get_num_threads(),
        "command": "python benchmarks/sparse_indexer_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"median_length": MEDIAN_LENGTH, "sigma": SIGMA, "clip": [MIN_LENGTH, MAX_LENGTH],
                 "batch_size": args.batch_size, "batches": args.batches, "real_tokens": real_tokens,
                 "padded_tokens": padded_tokens},
        "model": {"family": "deepseek_v32", "layers": args.layers, "hidden": args.hidden, "index_topk": args.topk,
                  "vocab": VOCAB},
        "versions": library_versions("torch", "transformers"),
        "ideal_speedup": ideal,
        "modes": results,
    }
    out_dir = args.out or Path("benchmarks/results") / device_name
    save_result(out, out_dir / "sparse_indexer_step.json")
    return out


if __name__ == "__main__":
    main()
