"""One training step (forward + backward + AdamW) of tiny hybrid / SSM models, padded vs packed.

    python benchmarks/recurrent_step.py                 # CPU, fp32, both models
    python benchmarks/recurrent_step.py --models mamba2

Models (random weights, built from configs):
- `qwen3_5`: Qwen3.5-shaped, 4 layers (3 gated delta-net + 1 full attention, as Qwen3.5's 3:1
  pattern), hidden 256, 8 heads / 2 key-value heads, delta-net 4 key / 8 value heads of 32;
- `mamba2`: Mamba-2, 4 layers, hidden 256, 8 SSM heads of 64, state 16, chunk 64.
Vocabulary 4096 for both.

Modes, on the same batches in the same order:
- `padded`: `PaddedCollator` (right padding, attention_mask), transformers' sdpa / its own mixers;
- `packcollate`: `PackedCollator` + `attn_implementation="packcollate"`: the attention layers run
  per sequence, every recurrent layer runs its examples apart in length buckets (no kernel package;
  on CPU this is the pure-PyTorch path).

Data: batches of 16 examples with FLAN-like lengths (lognormal, median 120, sigma 0.9, clipped to
[8, 1024]), as benchmarks/attention_step.py. The table gives real (non-pad) tokens/s, the median step,
the speed-up over padded, the ideal speed-up (padded tokens / real tokens) and the fraction of it
reached (target: >= 0.8).
"""

from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import _common as common
import torch

import packcollate  # registers the backend; packcollate.prepare restarts the recurrent layers
from packcollate import PackedCollator, PaddedCollator
from packcollate.tools.bench import library_versions

VOCAB = 4096


def qwen3_5_config():
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
        linear_value_head_dim=32, max_position_embeddings=2048, use_cache=False,
    )


def mamba2_config():
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_heads=8, head_dim=64, expand=2, state_size=16,
        n_groups=1, chunk_size=64, use_cache=False,
    )


CONFIGS = {"qwen3_5": qwen3_5_config, "mamba2": mamba2_config}
MODES = {"padded": (PaddedCollator, "sdpa"), "packcollate": (PackedCollator, "packcollate")}


def build(config, implementation: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation)
    except ValueError:  # Mamba-2 has no attention to choose for the padded mode: its default
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return packcollate.prepare(model)


def bench_model(config_of, batches: list[list[dict]], repeats: int) -> dict:
    """One model (`config_of()` builds its config) padded vs packed, on `batches`."""
    config = config_of()
    runs = {}
    for mode, (collator_class, implementation) in MODES.items():
        model = build(config, implementation)
        runs[mode] = common.step_run(model, [collator_class()(b) for b in batches], torch.device("cpu"))
    real, padded = (sum(counts) for counts in common.token_counts(batches))
    ideal = padded / real
    results = common.round_robin(runs, repeats, torch.device("cpu"), real)  # same weights: the first losses agree
    speedup = results["packcollate"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    return {"ideal_speedup": ideal, "packed_speedup": speedup, "fraction_of_ideal": speedup / ideal,
            "first_loss_diff": abs(results["padded"]["first_loss"] - results["packcollate"]["first_loss"]),
            "params": sum(p.numel() for p in runs["padded"]["model"].parameters()), "modes": results}


def print_models(results: dict[str, dict], batch_size: int, device_name: str, threads: int) -> None:
    """The table of `bench_model` results, one row a model."""
    print(f"train step, {batch_size} FLAN-like examples per step, {device_name}, fp32, {threads} thread(s)")
    print(f"{'model':9} {'padded tok/s':>13} {'packed tok/s':>13} {'packed/padded':>14} {'ideal':>7} {'of ideal':>9} "
          f"{'loss diff':>10}")
    for name, r in results.items():
        print(f"{name:9} {r['modes']['padded']['tokens_per_s']:13.0f} {r['modes']['packcollate']['tokens_per_s']:13.0f} "
              f"{r['packed_speedup']:13.2f}x {r['ideal_speedup']:6.2f}x {r['fraction_of_ideal']:9.2f} "
              f"{r['first_loss_diff']:10.2e}")


def run(benchmark: str, script: str, doc: str, argv, vocab: int, batches: int, batch_size: int,
        models: dict | None = None) -> dict:
    """A step benchmark's `main`: parse `argv` (`--models` when `models` is None: `CONFIGS`), time every model on
    the same FLAN-like batches of ids in `[3, vocab)`, print the table, save `<benchmark>_float32.json`.
    `models`: name -> config function of a one-family benchmark (`qwen4_exp_step.py`, `blt_step.py`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if models is None:
        parser.add_argument("--models", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    common.add_batch_arguments(parser, batches=batches, batch_size=batch_size)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shared machine has 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device name>/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device_name = f"cpu-{platform.machine()}"
    configs = models or {name: CONFIGS[name] for name in args.models}
    data = common.flan_like_batches(args.batches, args.batch_size, vocab)
    results = {name: bench_model(config_of, data, args.repeats) for name, config_of in configs.items()}
    print_models(results, args.batch_size, device_name, args.threads)
    out = {
        "benchmark": benchmark,
        "device": device_name,
        "dtype": "float32",
        "command": common.command_line(script, argv),
        "data": common.flan_data(args.batch_size, args.batches, vocab=vocab),
        "threads": args.threads,
        "versions": library_versions("torch", "transformers"),
        "models": results,
    }
    common.save_step_result(out, args.out, device_name, f"{benchmark}_float32.json")
    return out


def main(argv=None) -> dict:
    return run("recurrent_step", __file__, __doc__, argv, VOCAB, batches=4, batch_size=16)


if __name__ == "__main__":
    main()
