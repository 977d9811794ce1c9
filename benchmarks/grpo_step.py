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
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import packcollate
from packcollate.tools.bench.config import DTYPES, PRESETS
from packcollate.tools.bench.data import synthetic_lengths
from packcollate.tools.bench.measure import fork_memory_available, peak_rss_in_child
from packcollate.tools.bench.modes import build_model
from packcollate.tools.bench.report import device_name

RESULTS = Path(__file__).parent / "results" / "grpo"
MODES = ("padded", "packed")


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
    made = {}
    for mode, cls, attn in (("padded", GRPOTrainer, "sdpa"), ("packed", PackedGRPOTrainer, "packcollate")):
        policy = build_model(args.preset, PRESETS[args.preset]["vocab_size"], dtype, device)
        policy.set_attn_implementation(attn)
        config = GRPOConfig(output_dir=f"/tmp/packcollate-grpo-bench/{mode}", report_to=[], save_strategy="no",
                            use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, gradient_checkpointing=False,
                            per_device_train_batch_size=args.prompts * args.generations,
                            num_generations=args.generations, max_completion_length=args.max_completion)
        extra = {"check_packing": False} if cls is PackedGRPOTrainer else {}
        trainer = cls(model=policy, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                      train_dataset=placeholder, processing_class=char_tokenizer(), **extra)
        trainer.ref_model = copy.deepcopy(trainer.model).eval() if args.reference else None
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        made[mode] = trainer
    return made


def grpo_step(trainer, optimizer, batch: dict, reference: bool) -> float:
    """The training phase of one GRPO step on a scored generation batch (see the module docstring)."""
    inputs = dict(batch)
    if reference:
        with torch.no_grad():
            input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.ref_model, input_ids, mask, batch["completion_ids"].shape[1])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=tuple(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--prompts", type=int, default=4, help="prompts per generation batch")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-completion", type=int, default=512, help="max_completion_length, the cap")
    parser.add_argument("--median-completion", type=int, default=96)
    parser.add_argument("--reference", action="store_true", help="time the reference log-prob pass too (beta > 0)")
    parser.add_argument("--steps", type=int, default=6, help="distinct generation batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the batches, modes interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a shared machine's cores)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/grpo/grpo_step_<preset>_<device>.json)")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vocab = PRESETS[args.preset]["vocab_size"]
    batches = [{k: v.to(device) for k, v in rollouts(args.prompts, args.generations, vocab, args, rng).items()}
               for _ in range(args.steps)]
    real = [int(b["prompt_mask"].sum() + b["completion_mask"].sum()) for b in batches]
    padded = [int(b["prompt_ids"].numel() + b["completion_ids"].numel()) for b in batches]
    at_cap = float(np.mean([float((b["completion_mask"].sum(1) == args.max_completion).float().mean()) for b in batches]))
    made = trainers(args, dtype, device)

    # the first step from the same weights: the same loss and entropy in both modes
    first = {mode: float(made[mode].compute_loss(made[mode].model, batches[0]).detach()) for mode in MODES}
    first_entropy = {mode: made[mode]._metrics["train"]["entropy"][-1] for mode in MODES}
    for trainer in made.values():
        trainer.model.zero_grad(set_to_none=True)

    heavy = sorted(range(args.steps), key=lambda i: real[i])[-2:]
    memory = {}
    for mode in MODES:
        trainer = made[mode]

        def train_heavy(trainer=trainer):
            optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-5)
            for i in heavy:
                grpo_step(trainer, optimizer, batches[i], args.reference)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            state = copy.deepcopy(trainer.model.state_dict())
            train_heavy()
            sync(device)
            memory[mode] = torch.cuda.max_memory_allocated(device) - base
            trainer.model.load_state_dict(state)
        elif fork_memory_available():
            memory[mode] = peak_rss_in_child(train_heavy)

    optimizers = {mode: torch.optim.AdamW(made[mode].model.parameters(), lr=1e-5) for mode in MODES}
    for mode in MODES:  # warm-up step
        grpo_step(made[mode], optimizers[mode], batches[0], args.reference)
    times = {mode: [[] for _ in range(args.steps)] for mode in MODES}
    for _ in range(args.repeats):
        for i in range(args.steps):
            for mode in MODES:  # interleaved: drift of a shared machine hits both modes alike
                sync(device)
                start = time.perf_counter()
                grpo_step(made[mode], optimizers[mode], batches[i], args.reference)
                sync(device)
                times[mode][i].append(time.perf_counter() - start)
    step_time = {mode: [statistics.median(t) for t in times[mode]] for mode in MODES}
    summary = {mode: {"seconds": sum(step_time[mode]), "tokens_per_s": sum(real) / sum(step_time[mode]),
                      "peak_memory_bytes": memory.get(mode), "first_loss": first[mode],
                      "first_entropy": first_entropy[mode]} for mode in MODES}
    ideal = sum(padded) / sum(real)
    speedup = summary["padded"]["seconds"] / summary["packed"]["seconds"]
    mem_ratio = (memory["packed"] / memory["padded"]) if memory.get("padded") else None
    result = {
        "benchmark": "grpo_step",
        "command": "python benchmarks/grpo_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device_name(device),
        "preset": args.preset,
        "model": PRESETS[args.preset],
        "dtype": str(dtype).replace("torch.", ""),
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
        "memory_method": "CUDA max_memory_allocated" if device.type == "cuda" else
                         "peak anonymous RSS increase of a forked child (weights + grads + AdamW state + activations)",
        "versions": {"python": platform.python_version(), "packcollate": packcollate.__version__,
                     "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "trl": __import__("trl").__version__},
    }
    out = Path(args.out) if args.out else RESULTS / f"grpo_step_{args.preset}_{result['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"GRPO training phase, {args.preset} ({result['dtype']}, {result['device']}), "
          f"{args.prompts * args.generations} rollouts/step{' + reference pass' if args.reference else ''}, "
          f"{sum(real)} real / {sum(padded)} padded tokens over {args.steps} steps, {at_cap:.0%} of completions at the cap")
    print(f"{'mode':<8} {'tokens/s':>10} {'speed-up':>9} {'peak memory':>12} {'memory':>7}")
    for mode in MODES:
        s = summary[mode]
        ratio = s["tokens_per_s"] / summary["padded"]["tokens_per_s"]
        peak = s["peak_memory_bytes"]
        mem = "" if not memory.get("padded") or peak is None else f"{peak / memory['padded']:.2f}x"
        print(f"{mode:<8} {s['tokens_per_s']:>10.0f} {ratio:>8.2f}x {mib(peak):>12} {mem:>7}")
    print(f"ideal speed-up (padded / real tokens): {ideal:.2f}x; measured {speedup:.2f}x = {speedup / ideal:.2f} of the "
          f"ideal; peak memory {'n/a' if mem_ratio is None else f'{mem_ratio:.2f}x'} padded; first step: loss "
          f"{first['padded']:.6g} / {first['packed']:.6g}, entropy rel. diff {result['first_entropy_rel_diff']:.1e}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
