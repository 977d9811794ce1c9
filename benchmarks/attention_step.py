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
from pathlib import Path

import _common as common
import torch

import packcollate  # noqa: F401  (registers the backend)
from packcollate import PackedCollator, PaddedCollator
from packcollate.backend import describe
from packcollate.tools.bench import library_versions


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
    common.add_device_arguments(parser)
    common.add_batch_arguments(parser, batches=6, batch_size=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device name>/")
    args = parser.parse_args(argv)
    device, dtype, device_name = common.device_and_dtype(args)

    batches = common.flan_like_batches(args.batches, args.batch_size, args.vocab, low=0)
    real_tokens, padded_tokens = common.token_counts(batches)
    base = build_model(args.layers, args.hidden, args.vocab, dtype, device)
    runs = {}
    for name, (collator, implementation) in modes().items():
        model = copy.deepcopy(base)
        model.set_attn_implementation(implementation)
        runs[name] = common.step_run(model, [collator(b) for b in batches], device)
    results = common.round_robin(runs, args.repeats, device, sum(real_tokens), baseline="padded-sdpa")
    ideal = sum(padded_tokens) / sum(real_tokens)
    packcollate_vs_hf = results["packcollate"]["tokens_per_s"] / results["hf-packed-sdpa"]["tokens_per_s"]

    print(f"train step, tiny Llama ({args.layers} layers, hidden {args.hidden}, GQA 8/2, vocab {args.vocab}), "
          f"{args.batch_size} FLAN-like examples per step, {device_name}, {str(dtype).replace('torch.', '')}")
    common.print_step_table(results, 16)
    print(f"{'ideal (padded/real tokens)':28} {ideal:19.2f}x")
    print(f"packcollate vs transformers' packed sdpa: {packcollate_vs_hf:.2f}x")
    common.print_loss_spread(results)
    print(describe())

    out = {
        "benchmark": "attention_step",
        "device": device_name,
        "dtype": str(dtype).replace("torch.", ""),
        "command": common.command_line(__file__, argv),
        "data": common.flan_data(args.batch_size, args.batches, real_tokens=real_tokens, padded_tokens=padded_tokens),
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": 8, "kv_heads": 2, "vocab": args.vocab},
        "versions": library_versions("torch", "transformers"),
        "ideal_speedup": ideal,
        "packcollate_vs_hf_packed_sdpa": packcollate_vs_hf,
        "modes": results,
    }
    common.save_step_result(out, args.out, device_name.replace(" ", "-"), f"attention_step_{out['dtype']}.json")
    return out


if __name__ == "__main__":
    main()
