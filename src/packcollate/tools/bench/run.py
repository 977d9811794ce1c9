"""`run_benchmark` and the `packcollate bench` command line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...backend.attention import describe
from ...compat.equivalence import checked_device
from ...errors import check_non_negative_int, check_positive_int
from ..versions import library_versions
from .config import BUILTIN_DATASETS, DTYPES, MODES, NOISY_SPREAD, PRESETS
from .data import load_data
from .measure import (
    check_losses,
    fork_memory_available,
    measure_memory_cuda,
    measure_memory_fork,
    time_by_mode,
    time_interleaved,
)
from .modes import build_model, build_modes, fixed_batches, preset_config
from .report import (
    check_targets,
    device_name,
    first_step_check,
    format_table,
    plot_result,
    summarise,
)


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _label(name: str) -> str:
    """A file-name-safe label of a preset or dataset (a path becomes its last component)."""
    path = Path(name)
    label = (path.stem if path.is_file() else path.name) if (os.sep in name or path.exists()) else name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label) or "data"


def _command(kwargs: dict) -> str:
    """The `packcollate bench` command line equivalent to `run_benchmark(**kwargs)`."""
    parts = ["packcollate", "bench"]
    negated = {"loss_check": "--no-loss-check", "plot": "--no-plot"}
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if key in negated:
            if not value:
                parts.append(negated[key])
            continue
        if value is None or value is False or (key in ("interleave", "memory", "hf_attn") and value == "auto"):
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def run_benchmark(
    preset: str = "tiny",
    dataset: str = "flan",
    *,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    modes: Sequence[str] | None = None,
    max_tokens: int | None = None,
    max_length: int | None = None,
    tokenizer: str | None = None,
    text_field: str | None = None,
    load_weights: bool = False,
    interleave: str = "auto",
    memory: str = "auto",
    memory_steps: int | None = 2,
    loss_check: bool = True,
    hf_attn: str = "auto",
    lr: float = 1e-5,
    seed: int = 0,
    threads: int | None = None,
    out: str | Path | None = None,
    plot: bool = True,
    command: str | None = None,
    quiet: bool = False,
) -> dict:
    """Run the benchmark; print a table, write `train_throughput_<preset>_<dataset>.json` (+ `.png`) to `out`.

    Args:
        preset: `"micro"`, `"tiny"`, `"llama-1b"` or a local model directory (see `PRESETS`).
        dataset: `"flan"`, `"orcamath"`, `"uniform"`, `"arithmetic"`, a `.jsonl` file or a `datasets`
            directory (with `tokenizer`).
        device: default `"cuda"` when available, else `"cpu"`.
        dtype: `"fp32"`, `"bf16"` or `"fp16"`; default fp32 on CPU, bf16 on CUDA.
        batch_size: examples per fixed step (default 16 on CPU, 8 on CUDA).
        steps: fixed batches in the epoch; the epoch holds `steps * batch_size` examples (default 8 / 40).
        warmup: untimed steps per mode before timing (default 1 / 3).
        repeats: times every batch is timed; its median counts (default 3 on CPU, 1 on CUDA).
        modes: subset of `MODES` (default all).
        max_tokens: token budget of `packcollate-budget` and TRL's row length (default: the mean
            real tokens of a fixed batch, so budget steps do the same work as fixed ones, balanced).
        max_length: truncate examples to this many tokens.
        tokenizer: local tokenizer directory for a file dataset.
        text_field: the field holding the text (default `text`, else prompt/completion, else messages).
        load_weights: load a local model directory's weights instead of a random init.
        interleave: `"step"` (modes take turns, each with its own model copy), `"mode"` (one mode
            after the other on one model) or `"auto"` (step on CPU, mode on CUDA).
        memory: `"fork"` (CPU peak RSS in a child per mode), `"cuda"`, `"off"` or `"auto"`.
        memory_steps: steps of a separate memory measurement (CPU fork, or CUDA with interleaved
            timing): the `k` largest batches of the mode (default 2), or 0 for warm-up + the whole
            epoch. With CUDA and one mode after the other, the peak is that of the timed run itself.
        loss_check: evaluate every mode's epoch loss at the initial weights in fp32.
        hf_attn: attention of `hf-flatten`: `"auto"` (flash_attention_2 on CUDA when installed, else sdpa).
        lr: AdamW learning rate.
        seed: seed of the data, the sampler and the initial weights.
        threads: `torch.set_num_threads` (CPU).
        out: output directory (default `benchmarks/results/<device name>/`); `""` writes nothing.
        plot: write the PNG.
        command: the command line recorded in the JSON (default: the equivalent `packcollate bench`).
        quiet: print nothing.

    Returns:
        The result dict (also written as JSON): `device`, `preset`, `dataset`, `command`,
        `ideal_speedup`, `modes` (per mode: `tokens_per_s`, `peak_mem_bytes`, `speedup_vs_padded`,
        `mem_vs_padded`, …), `loss_check`, and the settings.
    """
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    kwargs = {k: v for k, v in locals().items() if k not in ("say", "command", "quiet", "out")}
    device_ = checked_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device_.type == "cuda"
    dtype_ = DTYPES[dtype or ("bf16" if on_cuda else "fp32")]
    batch_size = (8 if on_cuda else 16) if batch_size is None else check_positive_int("--batch-size", batch_size)
    steps = (40 if on_cuda else 8) if steps is None else check_positive_int("--steps", steps)
    warmup = (3 if on_cuda else 1) if warmup is None else check_non_negative_int("--warmup", warmup)
    repeats = (1 if on_cuda else 3) if repeats is None else check_positive_int("--repeats", repeats)
    if memory_steps is not None:
        check_non_negative_int("--memory-steps", memory_steps)
    for flag, value in (("--max-tokens", max_tokens), ("--max-length", max_length), ("--threads", threads)):
        if value is not None:
            check_positive_int(flag, value)
    modes = list(modes) if modes else list(MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes: expected names from {MODES}, got {unknown}")
    if interleave == "auto":
        interleave = "mode" if on_cuda else "step"
    if interleave not in ("step", "mode"):
        raise ValueError(f"interleave: expected 'auto', 'step' or 'mode', got {interleave!r}")
    if memory == "auto":
        memory = "cuda" if on_cuda else ("fork" if fork_memory_available() else "off")
    if memory == "cuda" and not on_cuda:
        raise ValueError(f"memory='cuda': expected a CUDA device, got {device_}")
    if memory == "fork" and (on_cuda or not fork_memory_available()):
        raise ValueError("memory='fork': expected a CPU run on Linux (os.fork and /proc/self/clear_refs)")
    if memory not in ("fork", "cuda", "off"):
        raise ValueError(f"memory: expected 'auto', 'fork', 'cuda' or 'off', got {memory!r}")
    if threads:
        torch.set_num_threads(threads)

    started = time.perf_counter()
    vocab_hint = PRESETS[preset]["vocab_size"] if preset in PRESETS else None
    if vocab_hint is None:
        vocab_hint = preset_config(preset).vocab_size
    data = load_data(dataset, steps * batch_size, vocab_size=vocab_hint, seed=seed, tokenizer=tokenizer,
                     text_field=text_field, max_length=max_length)
    lengths = data.lengths
    model = build_model(preset, data.vocab_size, dtype_, device_, load_weights=load_weights, seed=seed)
    n_params = _parameters(model)
    name = device_name(device_)
    say(f"packcollate bench: {preset} ({n_params / 1e6:.1f} M parameters, {str(dtype_).replace('torch.', '')}) "
        f"on {dataset}, {len(lengths)} examples ({int(lengths.sum())} tokens; length mean {lengths.mean():.0f}, "
        f"median {np.median(lengths):.0f}, max {lengths.max()}), {batch_size} examples/step, {name}, "
        f"{torch.get_num_threads()} threads")

    runs, max_tokens, notes = build_modes(data, modes, batch_size, device_, max_tokens=max_tokens,
                                          hf_attn=hf_attn, seed=seed)
    for note in notes:
        say(f"note: {note}")
    init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    if memory == "fork":  # first, while this process has allocated and freed the least
        say("peak memory: each mode in a forked child (one thread), peak anonymous RSS increase")
        measure_memory_fork(model, runs, memory_steps, warmup, lr, device_, say)
    loss_result = None
    if loss_check:
        say("loss check: token-mean loss over the whole epoch at the initial weights (fp32, no optimizer step)")
        loss_result = check_losses(model, runs, torch.float32, device_, say)
    say(f"timing: {warmup} warm-up steps, then every batch x {repeats}, "
        f"{'modes taking turns step by step' if interleave == 'step' else 'one mode after the other'}")
    if interleave == "step":
        time_interleaved(model, runs, warmup, repeats, lr, device_, say)
        if memory == "cuda":
            measure_memory_cuda(model, init_state, runs, memory_steps, warmup, lr, device_, say)
    else:
        time_by_mode(model, init_state, runs, warmup, repeats, lr, device_, memory == "cuda", say)

    modes_result = summarise(runs)
    fixed = fixed_batches(len(lengths), batch_size)
    padded_tokens = sum(len(b) * int(lengths[b].max()) for b in fixed)
    ideal = padded_tokens / int(lengths.sum())
    first_step = first_step_check(runs, dtype_)
    checks = {"first_step": first_step, "epoch": loss_result,
              "passed": bool(first_step["passed"] and (loss_result is None or loss_result["passed"]))}
    which = ("warm-up + the whole epoch" if not memory_steps else
             f"its {memory_steps} batch{'es' if memory_steps > 1 else ''} computing the most tokens, largest last")
    memory_method = {
        "cuda": "torch.cuda.max_memory_allocated, reset before each mode; only that mode's model, gradients, "
                "AdamW state and activations on the device; over "
                + ("the mode's warm-up and timed steps" if interleave == "mode" else which),
        "fork": "peak anonymous RSS increase of a forked child per mode that copies the initial model and "
                f"trains on {which}, one thread (VmHWM after a /proc/self/clear_refs reset, less "
                "file-backed RssFile/RssShmem at the end, minus RssAnon before): weights + gradients + AdamW "
                "state + activations + allocator overhead",
        "off": "not measured",
    }[memory]
    label = {"cuda": "peak CUDA memory", "fork": "peak RSS increase (a fork per mode)", "off": "memory"}[memory]
    result = {
        "benchmark": "train_throughput",
        "device": name,
        "preset": preset,
        "dataset": dataset,
        "command": command or _command(kwargs),
        "dtype": str(dtype_).replace("torch.", ""),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "interleave": interleave,
        "memory_method": memory_method,
        "memory_method_short": label,
        "threads": torch.get_num_threads(),
        "max_tokens": max_tokens,
        "ideal_speedup": ideal,
        "data": {"source": data.source, "examples": len(lengths), "tokens": int(lengths.sum()),
                 "mean_length": float(lengths.mean()), "median_length": float(np.median(lengths)),
                 "max_length": int(lengths.max()), "padded_tokens": padded_tokens,
                 "completion_only": any("labels" in e for e in data.examples[:1])},
        "model": {"parameters": n_params, "config": {k: v for k, v in PRESETS.get(preset, {}).items()},
                  "vocab_size": int(model.config.vocab_size), "random_init": not load_weights},
        "versions": library_versions("torch", "transformers", "trl"),
        "modes": modes_result,
        "loss_check": checks,
        "notes": notes,
        "kernels": describe(),
        "wall_seconds": None,
    }
    targets = check_targets(result, device_.type)
    if targets:
        result["targets"] = targets
    result["wall_seconds"] = time.perf_counter() - started

    say("")
    say(f"{preset} on {dataset}: {batch_size} examples/step, {str(dtype_).replace('torch.', '')}, {name}; "
        f"peak memory = {label}")
    say(format_table(result))
    say(f"ideal speed-up (padded tokens / real tokens): {ideal:.2f}x; token budget of the budget/bfd modes: {max_tokens}")
    say(f"first-step loss, same batches ({', '.join(first_step['modes'])}): max difference "
        f"{first_step['max_difference']:.2e} (tolerance {first_step['tolerance']:g}) -> "
        f"{'match' if first_step['passed'] else 'MISMATCH'}")
    if loss_result is not None:
        say(f"epoch loss at init, every mode (fp32): max difference {loss_result['max_difference']:.2e} "
            f"(tolerance {loss_result['tolerance']:g}) -> {'match' if loss_result['passed'] else 'MISMATCH'}")
    spreads = [r["repeat_spread"] for r in modes_result.values() if r["repeat_spread"] is not None]
    if spreads and max(spreads) > NOISY_SPREAD:
        say(f"warning: noisy timings: repeats of the same batch differ by up to {100 * max(spreads):.0f}% (median "
            f"over batches, worst mode); the machine was busy: rerun on a quiet one, or compare the best-case "
            f"rates in the JSON (tokens_per_s_best)")
    for target in targets:
        say(f"target {target['mode']}: {target['what']} -> {'met' if target['met'] else 'NOT met'}")
    say(describe())

    if out != "":
        out_dir = Path(out) if out else Path("benchmarks/results") / name
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"train_throughput_{_label(preset)}_{_label(dataset)}"
        json_path = out_dir / f"{stem}.json"
        if plot:
            try:
                result["plot"] = str(plot_result(result, out_dir / f"{stem}.png"))
            except ImportError as error:
                say(f"no plot: {error}")
        json_path.write_text(json.dumps(result, indent=2))
        result["json"] = str(json_path)
        say(f"wrote {json_path}" + (f" and {result['plot']}" if "plot" in result else ""))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny",
                        help=f"model: one of {', '.join(PRESETS)} or a local model directory (default tiny)")
    parser.add_argument("--dataset", default="flan",
                        help=f"lengths: one of {', '.join(BUILTIN_DATASETS)}, a .jsonl file or a datasets "
                             "directory (default flan)")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory for a file dataset")
    parser.add_argument("--text-field", default=None, help="field holding the text (default: text, "
                                                           "else prompt/completion, else messages)")
    parser.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    parser.add_argument("--load-weights", action="store_true", help="load a model directory's weights "
                                                                    "(default: random init from its config)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per fixed step (default 16 CPU, 8 CUDA)")
    parser.add_argument("--steps", type=int, default=None,
                        help="fixed batches in the epoch (default 8 CPU, 40 CUDA); epoch = steps x batch size examples")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default 1 CPU, 3 CUDA)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="times each batch is timed, median kept (default 3 CPU, 1 CUDA)")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="token budget of packcollate-budget / trl-bfd (default: mean real tokens of a fixed "
                             "batch, at least the longest example)")
    parser.add_argument("--interleave", choices=("auto", "step", "mode"), default="auto",
                        help="modes take turns by step (CPU default) or run one after the other (CUDA default)")
    parser.add_argument("--memory", choices=("auto", "fork", "cuda", "off"), default="auto",
                        help="peak memory: fork (CPU: peak RSS increase of a forked child per mode), cuda "
                             "(max_memory_allocated), off")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps of the separate memory run: the k batches computing the most tokens, "
                             "largest last (default 2); 0: warm-up + the whole epoch")
    parser.add_argument("--no-loss-check", dest="loss_check", action="store_false",
                        help="skip the fp32 epoch-loss check at the initial weights")
    parser.add_argument("--hf-attn", default="auto", help="attention of hf-flatten (default: flash_attention_2 on "
                                                          "CUDA when installed, else sdpa)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device name>/)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write no PNG")


def main(args: argparse.Namespace) -> int:
    argv = sys.argv[1:] if sys.argv and sys.argv[0] else []
    command = shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "packcollate", *argv])
    result = run_benchmark(
        args.preset,
        args.dataset,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        modes=args.modes.split(",") if args.modes else None,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        load_weights=args.load_weights,
        interleave=args.interleave,
        memory=args.memory,
        memory_steps=args.memory_steps,
        loss_check=args.loss_check,
        hf_attn=args.hf_attn,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        out=args.out,
        plot=args.plot,
        command=command,
    )
    return 0 if result["loss_check"]["passed"] else 1
