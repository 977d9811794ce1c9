"""One training step (forward + backward + AdamW) of a tiny Llama, padded vs packed, side by side.

    python benchmarks/attention_step.py                      # CPU, fp32
    python benchmarks/attention_step.py --device cuda --dtype bf16

Modes, on the same batches in the same order:
- `padded-sdpa`: `PaddedCollator` (right padding, attention_mask), transformers' sdpa;
- `hf-packed-sdpa`: transformers' `DataCollatorWithFlattening`, sdpa detecting packing from
  `position_ids` (`use_cache=False`; it builds an N x N mask);
- `packcollate`: `PackedCollator` + the `packcollate` attention backend (per-sequence exact attention
  on CPU, a varlen kernel on CUDA).

Data: batches of 16 examples with FLAN-like lengths: lognormal with median 120 tokens and sigma 0.9,
clipped to [8, 1024] (short, very uneven instruction data). Model: Llama-shaped, 4 layers, hidden 256,
8 heads, 2 key/value heads (GQA), vocabulary 4096 (as the `tiny` preset of `packcollate bench`: the LM
head is then about a quarter of the matrix work, as in Llama-3.2-1B; with `--vocab 32000` a 256-wide
model spends most of its step in the LM head, which packing does not change). The table shows real (non-pad) tokens/s, the
median step time, the speed-up over padded, and the ideal speed-up (padded tokens / real tokens).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import numpy as np
import torch

import packcollate  # noqa: F401  (registers the backend)
from packcollate import PackedCollator, PaddedCollator
from packcollate.backend import describe
from packcollate.tools.bench import (
    library_versions,
    round_robin_summary,
    save_result,
    time_round_robin,
)

MEDIAN_LENGTH, SIGMA, MIN_LENGTH, MAX_LENGTH = 120, 0.9, 8, 1024
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flan_like_batches(n_batches: int, batch_size: int, vocab: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        lengths = np.clip(rng.lognormal(np.log(MEDIAN_LENGTH), SIGMA, batch_size), MIN_LENGTH, MAX_LENGTH).astype(int)
        batches.append([{"input_ids": rng.integers(0, vocab, n).tolist()} for n in lengths])
    return batches


def build_model(layers: int, hidden: int, vocab: int, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        use_cache=False,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device=device, dtype=dtype)


def modes() -> dict:
    """name -> (collator, attention implementation)."""
    from transformers import DataCollatorWithFlattening

    return {
        "padded-sdpa": (PaddedCollator(), "sdpa"),
        "hf-packed-sdpa": (DataCollatorWithFlattening(), "sdpa"),
        "packcollate": (PackedCollator(), "packcollate"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--batches", type=int, default=6, help="distinct batches, each timed --repeats times")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device name>/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"

    batches = flan_like_batches(args.batches, args.batch_size, args.vocab)
    real_tokens = [sum(len(f["input_ids"]) for f in b) for b in batches]
    padded_tokens = [len(b) * max(len(f["input_ids"]) for f in b) for b in batches]
    base = build_model(args.layers, args.hidden, args.vocab, dtype, device)
    runs = {}
    for name, (collator, implementation) in modes().items():
        model = copy.deepcopy(base)
        model.set_attn_implementation(implementation)
        model.train()
        runs[name] = {
            "model": model,
            "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-4),
            "batches": [{k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(b).items()} for b in batches],
        }
    time_round_robin(runs, args.repeats, device)
    ideal = sum(padded_tokens) / sum(real_tokens)
    results = round_robin_summary(runs, sum(real_tokens))
    padded = results["padded-sdpa"]["tokens_per_s"]
    for r in results.values():
        r["speedup_vs_padded"] = r["tokens_per_s"] / padded
    packcollate_vs_hf = results["packcollate"]["tokens_per_s"] / results["hf-packed-sdpa"]["tokens_per_s"]

    print(f"train step, tiny Llama ({args.layers} layers, hidden {args.hidden}, GQA 8/2, vocab {args.vocab}), "
          f"{args.batch_size} FLAN-like examples per step, {device_name}, {str(dtype).replace('torch.', '')}")
    print(f"{'mode':16} {'real tok/s':>11} {'median step':>12} {'vs padded':>10} {'first loss':>11}")
    for name, r in results.items():
        print(f"{name:16} {r['tokens_per_s']:11.0f} {r['median_step_s'] * 1e3:10.1f}ms {r['speedup_vs_padded']:9.2f}x "
              f"{r['first_loss']:11.6f}")
    print(f"{'ideal (padded/real tokens)':28} {ideal:19.2f}x")
    print(f"packcollate vs transformers' packed sdpa: {packcollate_vs_hf:.2f}x")
    losses = [r["first_loss"] for r in results.values()]
    print(f"same first-step loss across modes: max difference {max(losses) - min(losses):.2e}")
    print(describe())

    out = {
        "benchmark": "attention_step",
        "device": device_name,
        "dtype": str(dtype).replace("torch.", ""),
        "command": "python benchmarks/attention_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"median_length": MEDIAN_LENGTH, "sigma": SIGMA, "clip": [MIN_LENGTH, MAX_LENGTH],
                 "batch_size": args.batch_size, "batches": args.batches, "real_tokens": real_tokens,
                 "padded_tokens": padded_tokens},
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": 8, "kv_heads": 2, "vocab": args.vocab},
        "versions": library_versions("torch", "transformers"),
        "ideal_speedup": ideal,
        "packcollate_vs_hf_packed_sdpa": packcollate_vs_hf,
        "modes": results,
    }
    out_dir = args.out or Path("benchmarks/results") / device_name.replace(" ", "-")
    save_result(out, out_dir / f"attention_step_{out['dtype']}.json")
    return out


if __name__ == "__main__":
    main()
