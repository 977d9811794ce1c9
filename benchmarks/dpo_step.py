"""DPO training step, padded (TRL's DPOTrainer) vs padding-free (PackedDPOTrainer): tokens/s and peak memory.

    python benchmarks/dpo_step.py                                   # CPU: tiny Llama (5 M), fp32
    python benchmarks/dpo_step.py --preset llama-1b --device cuda --dtype bf16 --pairs 8   # a GPU

One step = the policy forward and backward and the reference forward on `--pairs` preference pairs
(2 x pairs sequences), TRL's loss (`compute_loss`, sigmoid), and an AdamW update. Both modes train on
the same batches from the same initial weights: `padded` pads every sequence to the batch's longest
(TRL's `DataCollatorForPreference`, sdpa with a padding mask), `packed` puts all sequences in one row
(`PackedPreferenceCollator`, the `packcollate` attention backend). tokens/s counts real tokens only
(prompt + completion of both sequences of every pair), the same work in both modes.

Pair lengths are FLAN-like and synthetic: prompts drawn from the `flan` distribution of
`packcollate.tools.bench` (lognormal, median 120 tokens, sigma 0.9, clipped to [8, 1024]); chosen and
rejected completions are half of two more independent draws (median 60). The ideal speed-up is
padded tokens / real tokens (what the padded step computes over what it needs).

Peak memory: on CPU the peak anonymous-RSS increase of a forked child per mode that trains on the
two batches with the most tokens (`packcollate.tools.bench.measure.peak_rss_in_child`); on CUDA
`torch.cuda.max_memory_allocated` over those steps. Results: benchmarks/results/<device>/dpo_step_<preset>.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import _common as common
import numpy as np
import torch

from packcollate.collate.preference import PackedPreferenceCollator
from packcollate.tools.bench.config import PRESETS
from packcollate.tools.bench.data import synthetic_lengths

RESULTS = Path(__file__).parent / "results"


def preference_pairs(n: int, vocab_size: int, seed: int) -> list[dict]:
    """`n` pairs `{"prompt_ids", "chosen_ids", "rejected_ids"}` of random tokens, FLAN-like lengths."""
    rng = np.random.default_rng(seed)
    prompts = synthetic_lengths("flan", n, rng)
    chosen, rejected = (np.maximum(synthetic_lengths("flan", n, rng) // 2, 4) for _ in range(2))
    draw = lambda k: rng.integers(3, vocab_size, int(k)).tolist()  # noqa: E731 - ids above pad/bos/eos
    return [{"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)}
            for p, c, r in zip(prompts, chosen, rejected)]


def trainers(args, dtype: torch.dtype, device: torch.device, output_dir: str) -> dict:
    """`{"padded": DPOTrainer (sdpa), "packed": PackedDPOTrainer (packcollate)}`, same initial weights."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from packcollate.integrations.trl import PackedDPOTrainer
    from packcollate.tools.toy import char_tokenizer

    placeholder = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # batches are ours

    def make(mode, cls, policy, extra):
        reference = copy.deepcopy(policy).eval()
        config = DPOConfig(output_dir=f"{output_dir}/{mode}", report_to=[], use_cpu=device.type == "cpu",
                           max_length=None, bf16=dtype == torch.bfloat16, save_strategy="no")
        return cls(model=policy, ref_model=reference, args=config, train_dataset=placeholder,
                   processing_class=char_tokenizer(), **extra)

    return common.paired_trainers(DPOTrainer, PackedDPOTrainer, 0, args, dtype, device, make)


def collate(mode: str, pairs: list[dict], device: torch.device) -> dict:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = DataCollatorForPreference(pad_token_id=0) if mode == "padded" else PackedPreferenceCollator()
    return common.to_device(collator(pairs), device)


def dpo_step(trainer, optimizer, batch: dict) -> float:
    return common.optimizer_step(trainer.compute_loss(trainer.model, batch), optimizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_preset_arguments(parser)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x sequences)")
    common.add_timing_arguments(parser, "distinct batches timed per repeat",
                                "JSON path (default benchmarks/results/<device>/dpo_step_<preset>.json)")
    args = parser.parse_args(argv)

    device, dtype = common.seeded_device(args)
    vocab = PRESETS[args.preset]["vocab_size"]
    pairs = preference_pairs(args.pairs * args.steps, vocab, args.seed)
    groups = [pairs[i * args.pairs : (i + 1) * args.pairs] for i in range(args.steps)]
    made = trainers(args, dtype, device, "/tmp/packcollate-dpo-bench")
    batches = {mode: [collate(mode, g, device) for g in groups] for mode in common.MODES}
    real = [int(b["input_ids"].numel()) for b in batches["packed"]]
    padded = [int(b["input_ids"].numel()) for b in batches["padded"]]

    def step(mode, optimizer, i):
        return dpo_step(made[mode], optimizer, batches[mode][i])

    # the first step from the same weights: the same loss and policy log-probs in both modes (at the
    # start the policy is the reference, so the loss is log 2; the log-probs are the real check)
    first, first_logps = common.first_step(made, lambda mode: batches[mode][0], "logps/chosen")
    memory = common.peak_memory(made, step, real, device)  # before timing changes the weights
    step_time = common.time_interleaved(made, step, args.steps, args.repeats, device)
    summary = common.mode_summary(step_time, real, memory, first)
    ideal, speedup, mem_ratio = common.ratios(summary, memory, real, padded)
    result = {
        **common.result_head("dpo_step", __file__, argv, args, device, dtype),
        "pairs_per_step": args.pairs,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "data": {"pairs": len(pairs), "real_tokens": sum(real), "padded_tokens": sum(padded),
                 "lengths": "prompt ~ flan (lognormal median 120, sigma 0.9, [8, 1024]); chosen, rejected ~ flan / 2"},
        "ideal_speedup": ideal,
        "speedup": speedup,
        "memory_ratio": mem_ratio,
        "first_loss_rel_diff": abs(first["packed"] - first["padded"]) / abs(first["padded"]),
        "first_logps_chosen": first_logps,
        "first_logps_rel_diff": abs(first_logps["packed"] - first_logps["padded"]) / abs(first_logps["padded"]),
        "modes": summary,
        **common.result_tail(device),
    }
    out = Path(args.out) if args.out else RESULTS / result["device"] / f"dpo_step_{args.preset}.json"
    common.write_json(result, out)

    print(f"DPO step, {args.preset} ({result['dtype']}, {result['device']}), {args.pairs} pairs/step, "
          f"{sum(real)} real / {sum(padded)} padded tokens over {args.steps} steps")
    common.print_memory_table(summary, memory, first_loss=True)
    print(f"ideal speed-up (padded / real tokens): {ideal:.2f}x; measured {speedup:.2f}x "
          f"({'meets' if speedup >= ideal else 'below'} the ideal); first step: loss rel. diff "
          f"{result['first_loss_rel_diff']:.1e}, logps/chosen rel. diff {result['first_logps_rel_diff']:.1e}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
