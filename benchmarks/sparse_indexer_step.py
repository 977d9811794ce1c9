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
from pathlib import Path

import _common as common
import torch

import packcollate
from packcollate import PackedCollator, PaddedCollator
from packcollate.tools.bench import library_versions

VOCAB = 4096


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
    common.add_batch_arguments(parser, batches=4, batch_size=16)
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
    batches = common.flan_like_batches(args.batches, args.batch_size, VOCAB)
    real_tokens, padded_tokens = common.token_counts(batches)
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
        runs[name] = common.step_run(model, [collator(b) for b in batches], device)
    results = common.round_robin(runs, args.repeats, device, sum(real_tokens), baseline="padded-sdpa")
    ideal = sum(padded_tokens) / sum(real_tokens)

    print(f"train step, tiny DeepSeek-V3.2 ({args.layers} layers, hidden {args.hidden}, indexer top-k {args.topk}, "
          f"vocab {VOCAB}), {args.batch_size} FLAN-like examples per step, {device_name}, fp32, "
          f"{torch.get_num_threads()} threads")
    common.print_step_table(results, 14)
    print(f"{'ideal (padded/real tokens)':26} {ideal:19.2f}x")
    common.print_loss_spread(results)

    out = {
        "benchmark": "sparse_indexer_step",
        "device": device_name,
        "dtype": "fp32",
        "threads": torch.get_num_threads(),
        "command": common.command_line(__file__, argv),
        "data": common.flan_data(args.batch_size, args.batches, real_tokens=real_tokens, padded_tokens=padded_tokens),
        "model": {"family": "deepseek_v32", "layers": args.layers, "hidden": args.hidden, "index_topk": args.topk,
                  "vocab": VOCAB},
        "versions": library_versions("torch", "transformers"),
        "ideal_speedup": ideal,
        "modes": results,
    }
    common.save_step_result(out, args.out, device_name, "sparse_indexer_step.json")
    return out


if __name__ == "__main__":
    main()
