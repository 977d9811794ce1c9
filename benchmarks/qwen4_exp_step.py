"""One training step (forward + backward + AdamW) of a tiny Qwen4-Exp, padded vs packed.

    python benchmarks/qwen4_exp_step.py                  # CPU, fp32, 1 thread

Model (random weights, built from a config): Qwen4-Exp-shaped, 4 layers (3 gated delta-net + 1 indexed
attention, its 3:1 pattern), hidden 128, 4 hyper-connection streams, 4 heads / 2 key-value heads of 32, MoE
of 4 experts (2 per token), a sparse indexer (budget 64 tokens, blocks of 4), PLE n-gram embeddings and the
dilated convolution on the first layer; vocabulary 4096.

Modes, on the same batches in the same order (`recurrent_step.py`'s harness):
- `padded`: `PaddedCollator` (right padding, attention_mask), transformers' sdpa and its own layers;
- `packcollate`: `PackedCollator` + `attn_implementation="packcollate"`, `packcollate.prepare`d: the indexed
  attention runs one bucket per example length (the indexer picks its top-k inside each example), the
  gated delta nets and the PLE layer run their examples apart in length buckets.

Data: FLAN-like lengths (lognormal, median 120, sigma 0.9, clipped to [8, 1024]), 8 examples a step (the
indexer loops over its queries in Python, so padded steps are slow). Real (non-pad) tokens/s, the
speed-up over padded and the ideal speed-up (padded tokens / real tokens), measured side by side.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import recurrent_step
import torch

from packcollate.tools.bench import library_versions, save_result


def qwen4_exp_config():
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen4_exp_text", vocab_size=recurrent_step.VOCAB, hidden_size=128, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["indexed_attention"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=4,
        num_experts_per_tok=2, hc_lowrank=64, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=32, indexer_budget=64,
        indexer_compress_ratio=4, ple_layer_ids=[1], ple_embed_dim=128, ngram_vocab_size_base=4096, eos_token_id=2, number_of_conv_states=3,
        max_position_embeddings=2048, use_cache=False,
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2, help="distinct batches, each timed --repeats times")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shared machine has 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device name>/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device_name = f"cpu-{platform.machine()}"
    recurrent_step.CONFIGS["qwen4_exp"] = qwen4_exp_config
    batches = recurrent_step.flan_like_batches(args.batches, args.batch_size)
    result = recurrent_step.bench_model("qwen4_exp", batches, args.repeats)

    print(f"train step, {args.batch_size} FLAN-like examples per step, {device_name}, fp32, {args.threads} thread(s)")
    print(f"{'model':9} {'padded tok/s':>13} {'packed tok/s':>13} {'packed/padded':>14} {'ideal':>7} {'of ideal':>9} "
          f"{'loss diff':>10}")
    print(f"{'qwen4_exp':9} {result['modes']['padded']['tokens_per_s']:13.0f} "
          f"{result['modes']['packcollate']['tokens_per_s']:13.0f} {result['packed_speedup']:13.2f}x "
          f"{result['ideal_speedup']:6.2f}x {result['fraction_of_ideal']:9.2f} {result['first_loss_diff']:10.2e}")
    out = {
        "benchmark": "qwen4_exp_step",
        "device": device_name,
        "dtype": "float32",
        "command": "python benchmarks/qwen4_exp_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"median_length": recurrent_step.MEDIAN_LENGTH, "sigma": recurrent_step.SIGMA,
                 "clip": [recurrent_step.MIN_LENGTH, recurrent_step.MAX_LENGTH], "batch_size": args.batch_size,
                 "batches": args.batches},
        "threads": args.threads,
        "versions": library_versions("torch", "transformers"),
        "models": {"qwen4_exp": result},
    }
    save_result(out, (args.out or Path("benchmarks/results") / device_name) / "qwen4_exp_step_float32.json")
    return out


if __name__ == "__main__":
    main()
