"""`packcollate demo`: fine-tune a tiny model padded and packed, and show the speed-up and equal losses.

Everything is embedded: the shipped arithmetic word problems (`packcollate.tools.toy`), a character
tokenizer, and a Llama-shaped model built from a config (random weights, CPU, fp32). Both runs see
the same batches in the same order from the same initial weights, train on completions only, and
must report the same loss at every step.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..backend import describe, prepare, use_backend
from ..collate.text import PackedCollator, PaddedCollator
from .toy import char_tokenizer, load_arithmetic, tokenize_prompt_completion

LOSS_TOLERANCE = 1e-4


@dataclass
class RunResult:
    """One training run: per-step losses and the timed steps' wall time."""

    losses: list[float]
    seconds: float
    real_tokens: int
    computed_tokens: int


def build_model(vocab_size: int, seed: int = 0):
    """A Llama-shaped model: 4 layers, hidden 128, 4 heads, 2 key/value heads."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        use_cache=False,
    )
    return prepare(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"))


def train_side_by_side(runs: dict[str, tuple], lr: float) -> dict[str, tuple[list[float], float]]:
    """AdamW steps for every run, interleaved step by step so machine noise hits all runs alike.

    `runs` maps a name to `(model, batches)`; returns per run the losses and the time of all steps
    but the first (warm-up).
    """
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=lr) for name, (model, _) in runs.items()}
    losses = {name: [] for name in runs}
    seconds = dict.fromkeys(runs, 0.0)
    steps = len(next(iter(runs.values()))[1])
    for i in range(steps):
        for name, (model, batches) in runs.items():
            model.train()
            start = time.perf_counter()
            loss = model(**batches[i]).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if i:
                seconds[name] += time.perf_counter() - start
            losses[name].append(float(loss.detach()))
    return {name: (losses[name], seconds[name]) for name in runs}


def run_demo(steps: int = 8, batch_size: int = 16, seed: int = 0, lr: float = 1e-3, quiet: bool = False) -> dict:
    """Train padded then packed on the same batches; return the measurements (and print them)."""
    say = (lambda *a: None) if quiet else print
    if steps < 2:
        raise ValueError(f"steps: expected at least 2 (step 0 is an untimed warm-up), got {steps}")
    tokenizer = char_tokenizer()
    problems = load_arithmetic()
    if steps * batch_size > len(problems):
        raise ValueError(f"steps x batch_size: expected at most the {len(problems)} shipped problems, "
                         f"got {steps} x {batch_size} = {steps * batch_size}")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(problems))[: steps * batch_size]
    examples = tokenize_prompt_completion([problems[i] for i in chosen], tokenizer)
    batches = [examples[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
    say(f"packcollate demo: {steps} steps x {batch_size} arithmetic word problems "
        f"({sum(len(e['input_ids']) for e in examples)} tokens), completion-only loss, tiny Llama on CPU")

    base = build_model(len(tokenizer), seed)
    packed_collator = PackedCollator()
    padded_collator = PaddedCollator.like(packed_collator, pad_token_id=tokenizer.pad_token_id)
    setups = {}
    for name, collator, implementation in (
        ("padded", padded_collator, "sdpa"),
        ("packed", packed_collator, "packcollate"),
    ):
        model = copy.deepcopy(base)
        use_backend(model, implementation)
        setups[name] = (model, [collator(b) for b in batches])
    trained = train_side_by_side(setups, lr)
    runs = {}
    for name, (losses, seconds) in trained.items():
        timed = setups[name][1][1:]
        real = [int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in timed]
        runs[name] = RunResult(losses, seconds, sum(real), sum(int(b["input_ids"].numel()) for b in timed))

    padded, packed = runs["padded"], runs["packed"]
    rate = {name: r.real_tokens / r.seconds for name, r in runs.items()}
    speedup = rate["packed"] / rate["padded"]
    ideal = padded.computed_tokens / padded.real_tokens
    max_diff = max(abs(a - b) for a, b in zip(padded.losses, packed.losses))
    match = max_diff < LOSS_TOLERANCE

    say("")
    say(f"{'run':8} {'real tokens/s':>14} {'tokens computed':>16} {'time':>8}")
    for name, r in runs.items():
        say(f"{name:8} {rate[name]:14.0f} {r.computed_tokens:16d} {r.seconds:7.2f}s")
    say(f"speed-up: {speedup:.2f}x (padding alone would allow {ideal:.2f}x; packed attention also skips "
        f"the padded attention work)")
    say("")
    say("step  loss padded   loss packed   difference")
    for i, (a, b) in enumerate(zip(padded.losses, packed.losses)):
        say(f"{i:4d}  {a:11.6f}  {b:11.6f}  {abs(a - b):11.2e}")
    say(f"losses match: {'yes' if match else 'NO'} (max difference {max_diff:.2e}, tolerance {LOSS_TOLERANCE:g})")
    say("")
    say(describe())
    return {
        "speedup": speedup,
        "ideal_speedup": ideal,
        "tokens_per_s": rate,
        "losses": {name: r.losses for name, r in runs.items()},
        "max_loss_diff": max_diff,
        "losses_match": match,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (default 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    result = run_demo(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    return 0 if result["losses_match"] else 1
