"""What the benchmark scripts share: command lines, FLAN-like batches, the round-robin step table, and the
TRL trainer steps (DPO, GRPO) timed side by side with their peak memory.

The scripts import it as `import _common as common` (run as `python benchmarks/<name>.py`, this folder is
first on the path). The step timing and summaries themselves are `packcollate.tools.bench`'s
(`time_round_robin`, `round_robin_summary`, `peak_rss_in_child`); this module holds the glue around them.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from packcollate.tools.bench import (
    DTYPES,
    PRESETS,
    build_model,
    device_name,
    fork_memory_available,
    library_versions,
    peak_rss_in_child,
    round_robin_summary,
    save_result,
    time_round_robin,
)

#: FLAN-like example lengths: lognormal with median 120 tokens and sigma 0.9, clipped to [8, 1024].
MEDIAN_LENGTH, SIGMA, MIN_LENGTH, MAX_LENGTH = 120, 0.9, 8, 1024
MODES = ("padded", "packed")  # the TRL trainer steps: TRL's trainer with padding, packcollate's packed one


def command_line(script: str, argv: list[str] | None) -> str:
    """`python benchmarks/<script's file name> <arguments>` as recorded in a result."""
    return f"python benchmarks/{Path(script).name} " + " ".join(argv if argv is not None else sys.argv[1:])


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device` (other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def optimizer_step(loss: torch.Tensor, optimizer) -> float:
    """Backward `loss`, step and clear `optimizer`; return the loss as a float."""
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- round-robin steps (attention, recurrent, ...)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` (CUDA when there is one) and `--dtype` (default fp32 on CPU, bf16 on CUDA)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, bf16 on CUDA")


def add_batch_arguments(parser: argparse.ArgumentParser, batches: int, batch_size: int) -> None:
    """`--batches`, `--batch-size`, `--repeats` (default 3) of a round-robin step benchmark."""
    parser.add_argument("--batches", type=int, default=batches, help="distinct batches, each timed --repeats times")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--repeats", type=int, default=3)


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str]:
    """The device, dtype and device name (`cpu-<machine>` or the CUDA device's name) of `add_device_arguments`."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return device, dtype, name


def flan_like_batches(n_batches: int, batch_size: int, vocab: int, seed: int = 0, low: int = 3) -> list[list[dict]]:
    """`n_batches` lists of `batch_size` examples `{"input_ids"}` of random ids in `[low, vocab)`, FLAN-like lengths."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        lengths = np.clip(rng.lognormal(np.log(MEDIAN_LENGTH), SIGMA, batch_size), MIN_LENGTH, MAX_LENGTH).astype(int)
        batches.append([{"input_ids": rng.integers(low, vocab, n).tolist()} for n in lengths])
    return batches


def flan_data(batch_size: int, batches: int, **extra) -> dict:
    """The `data` entry of a result on `flan_like_batches`."""
    return {"median_length": MEDIAN_LENGTH, "sigma": SIGMA, "clip": [MIN_LENGTH, MAX_LENGTH],
            "batch_size": batch_size, "batches": batches, **extra}


def token_counts(batches: list[list[dict]]) -> tuple[list[int], list[int]]:
    """Per batch: real tokens, and tokens once right-padded to the batch's longest example."""
    real = [sum(len(e["input_ids"]) for e in b) for b in batches]
    padded = [len(b) * max(len(e["input_ids"]) for e in b) for b in batches]
    return real, padded


def step_run(model, batches: list[dict], device: torch.device) -> dict:
    """A run of `time_round_robin`: the model (in train mode), AdamW (lr 1e-4), the collated batches on `device`."""
    model.train()
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-4),
            "batches": [to_device(b, device) for b in batches]}


def round_robin(runs: dict[str, dict], repeats: int, device: torch.device, real_tokens: int,
                baseline: str | None = None) -> dict[str, dict]:
    """`time_round_robin` then `round_robin_summary` of `step_run`s; with a `baseline` mode, each mode's
    `speedup_vs_padded` too (its tokens/s over the baseline's)."""
    time_round_robin(runs, repeats, device)
    results = round_robin_summary(runs, real_tokens)
    if baseline is not None:
        padded = results[baseline]["tokens_per_s"]
        for r in results.values():
            r["speedup_vs_padded"] = r["tokens_per_s"] / padded
    return results


def save_step_result(result: dict, out: Path | None, device_name: str, filename: str) -> Path:
    """`save_result` into `out`, by default `benchmarks/results/<device_name>/` (relative to the working folder)."""
    return save_result(result, (out or Path("benchmarks/results") / device_name) / filename)


def print_step_table(results: dict[str, dict], width: int) -> None:
    """The table of `round_robin` results with a baseline, modes in a `width`-wide column."""
    print(f"{'mode':{width}} {'real tok/s':>11} {'median step':>12} {'vs padded':>10} {'first loss':>11}")
    for name, r in results.items():
        print(f"{name:{width}} {r['tokens_per_s']:11.0f} {r['median_step_s'] * 1e3:10.1f}ms "
              f"{r['speedup_vs_padded']:9.2f}x {r['first_loss']:11.6f}")


def print_loss_spread(results: dict[str, dict]) -> None:
    losses = [r["first_loss"] for r in results.values()]
    print(f"same first-step loss across modes: max difference {max(losses) - min(losses):.2e}")


# ---------------------------------------------------------------- TRL trainer steps (DPO, GRPO), padded vs packed


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """`--preset` (a `packcollate bench` preset), `--device`, `--dtype`."""
    parser.add_argument("--preset", default="tiny", choices=tuple(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))


def add_timing_arguments(parser: argparse.ArgumentParser, steps_help: str, out_help: str) -> None:
    """`--steps`, `--repeats`, `--seed`, `--threads`, `--out`."""
    parser.add_argument("--steps", type=int, default=6, help=steps_help)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the batches, modes interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a shared machine's cores)")
    parser.add_argument("--out", default=None, help=out_help)


def seeded_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of `add_preset_arguments`; sets the threads and torch's seed."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.device(args.device), DTYPES[args.dtype]


def paired_trainers(trl_class, packed_class, vocab_size: int, args, dtype, device, make: Callable) -> dict:
    """`{"padded": trl_class (sdpa), "packed": packed_class (packcollate)}`, same initial weights, in train mode.

    `make(mode, cls, policy, extra)` builds one trainer on `policy` (a `build_model(args.preset, ...)` on
    the mode's attention); `extra` (`check_packing=False` for the packed class) goes to its constructor."""
    made = {}
    for mode, cls, attn in (("padded", trl_class, "sdpa"), ("packed", packed_class, "packcollate")):
        policy = build_model(args.preset, vocab_size, dtype, device)
        policy.set_attn_implementation(attn)
        extra = {"check_packing": False} if cls is packed_class else {}
        trainer = make(mode, cls, policy, extra)
        trainer.model.train()
        made[mode] = trainer
    return made


def first_step(made: dict, batch_of: Callable[[str], dict], metric: str) -> tuple[dict, dict]:
    """Each trainer's loss on its first batch from the same weights, and the `metric` it logged (gradients cleared)."""
    first = {mode: float(made[mode].compute_loss(made[mode].model, batch_of(mode)).detach()) for mode in MODES}
    logged = {mode: made[mode]._metrics["train"][metric][-1] for mode in MODES}
    for trainer in made.values():
        trainer.model.zero_grad(set_to_none=True)
    return first, logged


def peak_memory(made: dict, step: Callable, real: list[int], device: torch.device) -> dict:
    """Per mode, the peak memory of training on the two batches with the most real tokens: CUDA
    `max_memory_allocated` (weights restored after) or a forked child's peak RSS increase; `{}` without either.
    `step(mode, optimizer, i)` trains mode `mode` on batch `i`."""
    heavy = sorted(range(len(real)), key=lambda i: real[i])[-2:]
    memory = {}
    for mode in MODES:
        model = made[mode].model

        def train_heavy(mode=mode, model=model):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            for i in heavy:
                step(mode, optimizer, i)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            state = copy.deepcopy(model.state_dict())
            train_heavy()
            sync(device)
            memory[mode] = torch.cuda.max_memory_allocated(device) - base
            model.load_state_dict(state)
        elif fork_memory_available():
            memory[mode] = peak_rss_in_child(train_heavy)
    return memory


def time_interleaved(made: dict, step: Callable, steps: int, repeats: int, device: torch.device) -> dict:
    """Per mode, the median seconds of each of `steps` batches over `repeats` passes, modes interleaved
    batch by batch (drift of a shared machine hits both alike), after one warm-up step on batch 0."""
    optimizers = {mode: torch.optim.AdamW(made[mode].model.parameters(), lr=1e-5) for mode in MODES}
    for mode in MODES:
        step(mode, optimizers[mode], 0)
    times = {mode: [[] for _ in range(steps)] for mode in MODES}
    for _ in range(repeats):
        for i in range(steps):
            for mode in MODES:
                sync(device)
                start = time.perf_counter()
                step(mode, optimizers[mode], i)
                sync(device)
                times[mode][i].append(time.perf_counter() - start)
    return {mode: [statistics.median(t) for t in times[mode]] for mode in MODES}


def mode_summary(step_time: dict, real: list[int], memory: dict, first: dict) -> dict:
    """Per mode: seconds, real tokens/s, peak memory bytes (None unmeasured), first-step loss."""
    return {mode: {"seconds": sum(step_time[mode]), "tokens_per_s": sum(real) / sum(step_time[mode]),
                   "peak_memory_bytes": memory.get(mode), "first_loss": first[mode]} for mode in MODES}


def ratios(summary: dict, memory: dict, real: list[int], padded: list[int]) -> tuple[float, float, float | None]:
    """The ideal speed-up (padded / real tokens), the measured one, and packed / padded peak memory."""
    ideal = sum(padded) / sum(real)
    speedup = summary["padded"]["seconds"] / summary["packed"]["seconds"]
    return ideal, speedup, (memory["packed"] / memory["padded"]) if memory.get("padded") else None


def result_head(benchmark: str, script: str, argv, args, device: torch.device, dtype: torch.dtype) -> dict:
    """The first keys of a TRL step result: benchmark, command, device, preset, model, dtype."""
    return {"benchmark": benchmark, "command": command_line(script, argv), "device": device_name(device),
            "preset": args.preset, "model": PRESETS[args.preset], "dtype": str(dtype).replace("torch.", "")}


def result_tail(device: torch.device) -> dict:
    """The last keys of a TRL step result: how memory was measured, the library versions."""
    rss = "peak anonymous RSS increase of a forked child (weights + grads + AdamW state + activations)"
    return {"memory_method": "CUDA max_memory_allocated" if device.type == "cuda" else rss,
            "versions": library_versions("torch", "transformers", "trl")}


def write_json(result: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def print_memory_table(summary: dict, memory: dict, first_loss: bool) -> None:
    """Per mode: tokens/s, speed-up over padded, peak memory and its ratio to padded (+ the first loss)."""
    print(f"{'mode':<8} {'tokens/s':>10} {'speed-up':>9} {'peak memory':>12} {'memory':>7}"
          + (f" {'first loss':>11}" if first_loss else ""))
    for mode in MODES:
        s = summary[mode]
        ratio = s["tokens_per_s"] / summary["padded"]["tokens_per_s"]
        peak = s["peak_memory_bytes"]
        mem = "" if not memory.get("padded") or peak is None else f"{peak / memory['padded']:.2f}x"
        print(f"{mode:<8} {s['tokens_per_s']:>10.0f} {ratio:>8.2f}x {mib(peak):>12} {mem:>7}"
              + (f" {s['first_loss']:>11.6f}" if first_loss else ""))
