"""Results: summary per mode, the table of ratios, the plot, targets and JSON."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from .config import SAME_BATCHES, STEP_LOSS_TOLERANCE, TARGETS
from .modes import ModeRun


def device_name(device: torch.device) -> str:
    """`cpu-x86_64`, or the CUDA device's name with spaces replaced (`NVIDIA-H100-80GB-HBM3`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"{device.type}-{platform.machine()}"


def summarise(runs: dict[str, ModeRun]) -> dict[str, dict]:
    """Per mode: tokens/s over the per-batch median step times, memory, losses and ratios to `padded`."""
    results = {}
    for name, run in runs.items():
        medians = [float(np.median(t)) for t in run.times]
        seconds = sum(medians)
        real, computed = sum(run.real_tokens), sum(run.computed_tokens)
        step_rates = [r / m for r, m in zip(run.real_tokens, medians)]
        best = sum(min(t) for t in run.times)
        spread = [(max(t) - min(t)) / min(t) for t in run.times if len(t) > 1]
        results[name] = {
            "tokens_per_s": real / seconds,
            "tokens_per_s_best": real / best,
            "repeat_spread": float(np.median(spread)) if spread else None,
            "median_step_s": float(np.median(medians)),
            "median_step_tokens_per_s": float(np.median(step_rates)),
            "epoch_seconds": seconds,
            "steps": len(run.batches),
            "examples": run.examples,
            "real_tokens": real,
            "computed_tokens": computed,
            "padded_fraction": 1 - real / computed,
            "peak_mem_bytes": run.peak_mem_bytes,
            "first_losses": run.losses[:3],
            "epoch_loss": run.epoch_loss,
            "collate_s_per_step": run.collate_seconds / len(run.batches),
            "attn_implementation": run.attn_implementation,
            "collator": run.collator_name,
            "note": run.note,
            "step_times_s": run.times,
        }
    padded = results.get("padded")
    for r in results.values():
        r["speedup_vs_padded"] = r["tokens_per_s"] / padded["tokens_per_s"] if padded else None
        r["ideal_speedup_vs_padded"] = padded["computed_tokens"] / r["computed_tokens"] if padded else None
        if padded and padded["peak_mem_bytes"] and r["peak_mem_bytes"] is not None:
            r["mem_vs_padded"] = r["peak_mem_bytes"] / padded["peak_mem_bytes"]
        else:
            r["mem_vs_padded"] = None
    return results


def first_step_check(runs: dict[str, ModeRun], dtype: torch.dtype) -> dict:
    """The first step's losses of the modes that train on the same batches (`SAME_BATCHES`) must agree."""
    same = [name for name in SAME_BATCHES if name in runs and runs[name].losses]
    losses = {name: runs[name].losses[0] for name in same}
    spread = max(losses.values()) - min(losses.values()) if len(losses) > 1 else 0.0
    tolerance = STEP_LOSS_TOLERANCE.get(dtype, 5e-2)
    return {"modes": same, "dtype": str(dtype).replace("torch.", ""), "tolerance": tolerance,
            "max_difference": spread, "passed": bool(spread <= tolerance), "losses": losses}


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(result: dict) -> str:
    """The result as a text table."""
    lines = [f"{'mode':19} {'steps':>5} {'real tok/s':>11} {'vs padded':>9} {'ideal':>6} {'pad %':>6} "
             f"{'peak mem':>10} {'vs padded':>9} {'loss step0':>11} {'epoch loss':>11}"]
    for name, r in result["modes"].items():
        first = f"{r['first_losses'][0]:.6f}" if r["first_losses"] else "-"
        epoch = "-" if r["epoch_loss"] is None else f"{r['epoch_loss']:.6f}"
        lines.append(f"{name:19} {r['steps']:5d} {r['tokens_per_s']:11.0f} {_fmt_ratio(r['speedup_vs_padded']):>9} "
                     f"{_fmt_ratio(r['ideal_speedup_vs_padded']):>6} {100 * r['padded_fraction']:5.1f}% "
                     f"{_fmt_bytes(r['peak_mem_bytes']):>10} {_fmt_ratio(r['mem_vs_padded']):>9} {first:>11} {epoch:>11}")
    return "\n".join(lines)


def _label_bars(ax, bars, ratios) -> None:
    """Write each bar's ratio to padded (`1.23x`) above it; None writes nothing."""
    for bar, ratio in zip(bars, ratios):
        if ratio is not None:
            ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)


def plot_result(result: dict, path: Path) -> Path:
    """Two bar charts (real tokens/s, peak memory per mode) into `path` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'packcollate[bench]' (or pip install matplotlib), "
                          "or pass --no-plot") from error
    names = list(result["modes"])
    modes = result["modes"]
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["#9e9e9e" if n.startswith("padded") else "#4c72b0" if n.startswith("packcollate") else "#dd8452"
              for n in names]
    rates = [modes[n]["tokens_per_s"] for n in names]
    _label_bars(ax_speed, ax_speed.bar(names, rates, color=colors), [modes[n]["speedup_vs_padded"] for n in names])
    if "padded" in modes:
        ideal = modes["padded"]["tokens_per_s"] * result["ideal_speedup"]
        ax_speed.axhline(ideal, color="k", linestyle="--", linewidth=1,
                         label=f"padded x ideal ({result['ideal_speedup']:.2f}x)")
        ax_speed.legend(fontsize=8, loc="lower right")
    ax_speed.set_ylabel("real (non-pad) tokens / s")
    ax_speed.set_title("training throughput")
    mems = [modes[n]["peak_mem_bytes"] for n in names]
    if any(m is not None for m in mems):
        values = [(m or 0) / 2**20 for m in mems]
        _label_bars(ax_mem, ax_mem.bar(names, values, color=colors), [modes[n]["mem_vs_padded"] for n in names])
        ax_mem.set_ylabel("peak memory (MiB)")
    else:
        ax_mem.text(0.5, 0.5, "memory not measured", ha="center", va="center", transform=ax_mem.transAxes)
    ax_mem.set_title(result["memory_method_short"])
    for ax in (ax_speed, ax_mem):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle(f"{result['preset']} on {result['dataset']}, {result['batch_size']} examples/step, "
                 f"{result['device']}, {result['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_targets(result: dict, device_type: str) -> list[dict]:
    """The `TARGETS` of the result's device type, preset and dataset: what each asks and whether it is met."""
    spec = TARGETS.get((device_type, result["preset"], result["dataset"]), {})
    found = []
    for mode, (speed, mem) in spec.items():
        r = result["modes"].get(mode)
        if r is None or r["speedup_vs_padded"] is None:
            continue
        if isinstance(speed, str):  # at least as fast as another mode
            other = result["modes"].get(speed) or {}
            if other.get("speedup_vs_padded") is None:
                continue
            bar, name = other["speedup_vs_padded"], f" ({speed})"
        else:
            bar, name = speed, ""
        met = r["speedup_vs_padded"] >= bar
        what = f"speed-up {r['speedup_vs_padded']:.2f}x >= {bar:.2f}x{name}"
        if mem is not None and r["mem_vs_padded"] is not None:
            met = met and r["mem_vs_padded"] <= mem
            what += f", memory {r['mem_vs_padded']:.2f}x <= {mem}x"
        found.append({"mode": mode, "what": what, "met": bool(met)})
    return found


def save_result(result: dict, path: Path) -> Path:
    """Write a benchmark's result as indented JSON to `path` (its folder made if missing); say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
