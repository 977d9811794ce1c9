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
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import packcollate
from packcollate.collate.preference import PackedPreferenceCollator
from packcollate.tools.bench.config import DTYPES, PRESETS
from packcollate.tools.bench.data import synthetic_lengths
from packcollate.tools.bench.measure import fork_memory_available, peak_rss_in_child
from packcollate.tools.bench.modes import build_model
from packcollate.tools.bench.report import device_name

RESULTS = Path(__file__).parent / "results"
MODES = ("padded", "packed")


def preference_pairs(n: int, vocab_size: int, seed: int) -> list[dict]:
    """`n` pairs `{"prompt_ids", "chosen_ids", "rejected_ids"}` of random tokens, FLAN-like lengths."""
    rng = np.random.default_rng(seed)
    prompts = synthetic_lengths("flan", n, rng)
    chosen, rejected = (np.maximum(synthetic_lengths("flan", n, rng) // 2, 4) for _ in range(2))
    draw = lambda k: rng.integers(3, vocab_size, int(k)).tolist()  # noqa: E731 - ids above pad/bos/eos
    return [{"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)}
            for p, c, r in zip(prompts, chosen, rejected)]


def trainers(preset: str, dtype: torch.dtype, device: torch.device, output_dir: str):
    """`{"padded": DPOTrainer (sdpa), "packed": PackedDPOTrainer (packcollate)}`, same initial weights."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from packcollate.integrations.trl import PackedDPOTrainer
    from packcollate.tools.toy import char_tokenizer

    placeholder = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # batches are ours
    made = {}
    for mode, cls, attn in (("padded", DPOTrainer, "sdpa"), ("packed", PackedDPOTrainer, "packcollate")):
        policy = build_model(preset, 0, dtype, device)
        policy.set_attn_implementation(attn)
        reference = copy.deepcopy(policy).eval()
        args = DPOConfig(output_dir=f"{output_dir}/{mode}", report_to=[], use_cpu=device.type == "cpu",
                         max_length=None, bf16=dtype == torch.bfloat16, save_strategy="no")
        extra = {"check_packing": False} if cls is PackedDPOTrainer else {}
        trainer = cls(model=policy, ref_model=reference, args=args, train_dataset=placeholder,
                      processing_class=char_tokenizer(), **extra)
        trainer.model.train()
        made[mode] = trainer
    return made


def collate(mode: str, pairs: list[dict], device: torch.device) -> dict:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = DataCollatorForPreference(pad_token_id=0) if mode == "padded" else PackedPreferenceCollator()
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(pairs).items()}


def dpo_step(trainer, optimizer, batch: dict) -> float:
    loss = trainer.compute_loss(trainer.model, batch)
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
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x sequences)")
    parser.add_argument("--steps", type=int, default=6, help="distinct batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the batches, modes interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a shared machine's cores)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/<device>/dpo_step_<preset>.json)")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = PRESETS[args.preset]["vocab_size"]
    pairs = preference_pairs(args.pairs * args.steps, vocab, args.seed)
    groups = [pairs[i * args.pairs : (i + 1) * args.pairs] for i in range(args.steps)]
    made = trainers(args.preset, dtype, device, "/tmp/packcollate-dpo-bench")
    batches = {mode: [collate(mode, g, device) for g in groups] for mode in MODES}
    real = [int(b["input_ids"].numel()) for b in batches["packed"]]
    padded = [int(b["input_ids"].numel()) for b in batches["padded"]]

    # the first step from the same weights: the same loss and policy log-probs in both modes (at the
    # start the policy is the reference, so the loss is log 2; the log-probs are the real check)
    first = {mode: float(made[mode].compute_loss(made[mode].model, batches[mode][0]).detach()) for mode in MODES}
    first_logps = {mode: made[mode]._metrics["train"]["logps/chosen"][-1] for mode in MODES}
    for trainer in made.values():
        trainer.model.zero_grad(set_to_none=True)

    # peak memory, before timing changes the weights: the two batches with the most real tokens
    heavy = sorted(range(args.steps), key=lambda i: real[i])[-2:]
    memory = {}
    for mode in MODES:
        trainer = made[mode]

        def train_heavy(trainer=trainer, mode=mode):
            optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-5)
            for i in heavy:
                dpo_step(trainer, optimizer, batches[mode][i])

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
        dpo_step(made[mode], optimizers[mode], batches[mode][0])
    times = {mode: [[] for _ in range(args.steps)] for mode in MODES}
    for _ in range(args.repeats):
        for i in range(args.steps):
            for mode in MODES:  # interleaved: drift of a shared machine hits both modes alike
                sync(device)
                start = time.perf_counter()
                dpo_step(made[mode], optimizers[mode], batches[mode][i])
                sync(device)
                times[mode][i].append(time.perf_counter() - start)
    step_time = {mode: [statistics.median(t) for t in times[mode]] for mode in MODES}
    summary = {
        mode: {
            "seconds": sum(step_time[mode]),
            "tokens_per_s": sum(real) / sum(step_time[mode]),
            "peak_memory_bytes": memory.get(mode),
            "first_loss": first[mode],
        }
        for mode in MODES
    }
    ideal = sum(padded) / sum(real)
    speedup = summary["padded"]["seconds"] / summary["packed"]["seconds"]
    mem_ratio = (memory["packed"] / memory["padded"]) if memory.get("padded") else None
    result = {
        "benchmark": "dpo_step",
        "command": "python benchmarks/dpo_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device_name(device),
        "preset": args.preset,
        "model": PRESETS[args.preset],
        "dtype": str(dtype).replace("torch.", ""),
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
        "memory_method": "CUDA max_memory_allocated" if device.type == "cuda" else
                         "peak anonymous RSS increase of a forked child (weights + grads + AdamW state + activations)",
        "versions": {"python": platform.python_version(), "packcollate": packcollate.__version__,
                     "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "trl": __import__("trl").__version__},
    }
    out = Path(args.out) if args.out else RESULTS / result["device"] / f"dpo_step_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"DPO step, {args.preset} ({result['dtype']}, {result['device']}), {args.pairs} pairs/step, "
          f"{sum(real)} real / {sum(padded)} padded tokens over {args.steps} steps")
    print(f"{'mode':<8} {'tokens/s':>10} {'speed-up':>9} {'peak memory':>12} {'memory':>7} {'first loss':>11}")
    for mode in MODES:
        s = summary[mode]
        ratio = s["tokens_per_s"] / summary["padded"]["tokens_per_s"]
        peak = s["peak_memory_bytes"]
        mem = "" if not memory.get("padded") or peak is None else f"{peak / memory['padded']:.2f}x"
        print(f"{mode:<8} {s['tokens_per_s']:>10.0f} {ratio:>8.2f}x {mib(s['peak_memory_bytes']):>12} {mem:>7} "
              f"{s['first_loss']:>11.6f}")
    print(f"ideal speed-up (padded / real tokens): {ideal:.2f}x; measured {speedup:.2f}x "
          f"({'meets' if speedup >= ideal else 'below'} the ideal); first step: loss rel. diff "
          f"{result['first_loss_rel_diff']:.1e}, logps/chosen rel. diff {result['first_logps_rel_diff']:.1e}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
