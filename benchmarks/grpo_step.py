"""The training phase of a GRPO step, padded (TRL's GRPOTrainer) vs padding-free (PackedGRPOTrainer):
tokens/s and peak memory side by side, with the ideal padding ratio.

    python benchmarks/grpo_step.py                       # CPU: tiny Llama (preset "tiny"), fp32
    python benchmarks/grpo_step.py --reference           # + the reference model's log-prob pass (beta > 0)
    python benchmarks/grpo_step.py --preset llama-1b --device cuda --dtype bf16     # a GPU

One step = what a GRPO trainer does with a generation batch once the completions are sampled and
scored: the policy's per-token log-probs and entropies (TRL's fused LM head), the loss (`compute_loss`,
`loss_type` dapo, TRL's default), its backward and an AdamW update; with `--reference`, first the
reference model's log-prob pass. Generation is not timed (it is TRL's own in both modes). Both modes
get the same inputs (TRL's left-padded prompts, right-padded completions, advantages) from the same
initial weights: `padded` runs them as TRL does (sdpa with a padding mask, `(B, P+C)`), `packed` runs
each rollout's prompt + completion in one row (`PackedGRPOTrainer`, the `packcollate` backend).
tokens/s counts real tokens (prompt + completion), the same work in both modes.

Rollouts: `--prompts` prompts x `--generations` completions each (a group shares its prompt). Prompt
lengths FLAN-like (`packcollate.tools.bench` "flan": lognormal, median 120, sigma 0.9, clipped to
[8, --max-prompt]); completion lengths lognormal, median `--median-completion` (default 96), sigma 1.0,
clipped to [1, --max-completion]: many short, some at the cap (~5% at 512). The ideal speed-up is
padded tokens / real tokens.

Peak memory: on CPU the peak anonymous-RSS increase of a forked child per mode that trains on the two
batches with the most tokens (`packcollate.tools.bench.measure.peak_rss_in_child`); on CUDA
`torch.cuda.max_memory_allocated`. Results: benchmarks/results/grpo/grpo_step_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import _common as common
import numpy as np
import torch

from packcollate.tools.bench.config import PRESETS
from packcollate.tools.bench.data import synthetic_lengths

RESULTS = Path(__file__).parent / "results" / "grpo"


def rollouts(prompts: int, generations: int, vocab: int, args, rng: np.random.Generator) -> dict:
    """One generation batch as TRL's trainer holds it: left-padded `prompt_ids` `(B, P)`, right-padded
    `completion_ids` `(B, C)`, their masks, advantages `(B,)` and the batch's completion token count."""
    prompt_lengths = np.repeat(synthetic_lengths("flan", prompts, rng, args.max_prompt), generations)
    completion_lengths = np.clip(np.round(rng.lognormal(math.log(args.median_completion), 1.0, prompts * generations)),
                                 1, args.max_completion).astype(np.int64)
    batch, width_p, width_c = len(prompt_lengths), int(prompt_lengths.max()), int(completion_lengths.max())
    prompt_ids = torch.zeros(batch, width_p, dtype=torch.long)
    prompt_mask = torch.arange(width_p).flip(0).unsqueeze(0) < torch.as_tensor(prompt_lengths).unsqueeze(1)
    completion_mask = torch.arange(width_c).unsqueeze(0) < torch.as_tensor(completion_lengths).unsqueeze(1)
    prompt_ids[prompt_mask] = torch.as_tensor(rng.integers(3, vocab, int(prompt_mask.sum())))
    completion_ids = torch.zeros(batch, width_c, dtype=torch.long)
    completion_ids[completion_mask] = torch.as_tensor(rng.integers(3, vocab, int(completion_mask.sum())))
    rewards = torch.as_tensor(rng.normal(size=(prompts, generations)), dtype=torch.float32)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask.long(), "completion_ids": completion_ids,
            "completion_mask": completion_mask.long(), "advantages": advantages,
            "num_items_in_batch": completion_mask.sum()}


def trainers(args, dtype: torch.dtype, device: torch.device) -> dict:
    """`{"padded": GRPOTrainer (sdpa), "packed": PackedGRPOTrainer (packcollate)}`, same initial weights."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from packcollate.integrations.trl import PackedGRPOTrainer
    from packcollate.tools.toy import char_tokenizer

    placeholder = datasets.Dataset.from_list([{"prompt": "a"}])  # the rollouts are ours

    def make(mode, cls, policy, extra):
        config = GRPOConfig(output_dir=f"/tmp/packcollate-grpo-bench/{mode}", report_to=[], save_strategy="no",
                            use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, gradient_checkpointing=False,
                            per_device_train_batch_size=args.prompts * args.generations,
                            num_generations=args.generations, max_completion_length=args.max_completion)
        trainer = cls(model=policy, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                      train_dataset=placeholder, processing_class=char_tokenizer(), **extra)
        trainer.ref_model = copy.deepcopy(trainer.model).eval() if args.reference else None
        trainer.current_gradient_accumulation_steps = 1
        return trainer

    vocab = PRESETS[args.preset]["vocab_size"]
    return common.paired_trainers(GRPOTrainer, PackedGRPOTrainer, vocab, args, dtype, device, make)


def grpo_step(trainer, optimizer, batch: dict, reference: bool) -> float:
    """The training phase of one GRPO step on a scored generation batch (see the module docstring)."""
    inputs = dict(batch)
    if reference:
        with torch.no_grad():
            input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.ref_model, input_ids, mask, batch["completion_ids"].shape[1])
    return common.optimizer_step(trainer.compute_loss(trainer.model, inputs), optimizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_preset_arguments(parser)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per generation batch")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-completion", type=int, default=512, help="max_completion_length, the cap")
    parser.add_argument("--median-completion", type=int, default=96)
    parser.add_argument("--reference", action="store_true", help="time the reference log-prob pass too (beta > 0)")
    common.add_timing_arguments(parser, "distinct generation batches timed per repeat",
                                "JSON path (default benchmarks/results/grpo/grpo_step_<preset>_<device>.json)")
    args = parser.parse_args(argv)

    device, dtype = common.seeded_device(args)
    rng = np.random.default_rng(args.seed)
    vocab = PRESETS[args.preset]["vocab_size"]
    batches = [common.to_device(rollouts(args.prompts, args.generations, vocab, args, rng), device)
               for _ in range(args.steps)]
    real = [int(b["prompt_mask"].sum() + b["completion_mask"].sum()) for b in batches]
    padded = [int(b["prompt_ids"].numel() + b["completion_ids"].numel()) for b in batches]
    at_cap = float(np.mean([float((b["completion_mask"].sum(1) == args.max_completion).float().mean()) for b in batches]))
    made = trainers(args, dtype, device)

    def step(mode, optimizer, i):
        return grpo_step(made[mode], optimizer, batches[i], args.reference)

    # the first step from the same weights: the same loss and entropy in both modes
    first, first_entropy = common.first_step(made, lambda mode: batches[0], "entropy")
    memory = common.peak_memory(made, step, real, device)  # before timing changes the weights
    step_time = common.time_interleaved(made, step, args.steps, args.repeats, device)
    summary = common.mode_summary(step_time, real, memory, first)
    for mode in common.MODES:
        summary[mode]["first_entropy"] = first_entropy[mode]
    ideal, speedup, mem_ratio = common.ratios(summary, memory, real, padded)
    result = {
        **common.result_head("grpo_step", __file__, argv, args, device, dtype),
        "rollouts_per_step": args.prompts * args.generations,
        "reference_pass": args.reference,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "data": {"real_tokens": sum(real), "padded_tokens": sum(padded), "fraction_of_completions_at_cap": at_cap,
                 "lengths": f"prompt ~ flan (lognormal median 120, sigma 0.9, [8, {args.max_prompt}]); completion ~ "
                            f"lognormal median {args.median_completion}, sigma 1.0, [1, {args.max_completion}]"},
        "ideal_speedup": ideal,
        "speedup": speedup,
        "speedup_over_ideal": speedup / ideal,
        "memory_ratio": mem_ratio,
        "first_loss": first,
        "first_entropy_rel_diff": abs(first_entropy["packed"] - first_entropy["padded"]) / abs(first_entropy["padded"]),
        "modes": summary,
        **common.result_tail(device),
    }
    out = Path(args.out) if args.out else RESULTS / f"grpo_step_{args.preset}_{result['device']}.json"
    common.write_json(result, out)

    print(f"GRPO training phase, {args.preset} ({result['dtype']}, {result['device']}), "
          f"{args.prompts * args.generations} rollouts/step{' + reference pass' if args.reference else ''}, "
          f"{sum(real)} real / {sum(padded)} padded tokens over {args.steps} steps, {at_cap:.0%} of completions at the cap")
    common.print_memory_table(summary, memory, first_loss=False)
    print(f"ideal speed-up (padded / real tokens): {ideal:.2f}x; measured {speedup:.2f}x = {speedup / ideal:.2f} of the "
          f"ideal; peak memory {'n/a' if mem_ratio is None else f'{mem_ratio:.2f}x'} padded; first step: loss "
          f"{first['padded']:.6g} / {first['packed']:.6g}, entropy rel. diff {result['first_entropy_rel_diff']:.1e}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
