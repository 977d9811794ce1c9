"""Measurements: timed training steps (interleaved or mode by mode), peak memory (CUDA allocator or
a forked child's peak RSS), and the loss checks."""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from ...backend import use_backend
from ...layout import IGNORE_INDEX
from .config import EPOCH_LOSS_TOLERANCE
from .modes import ModeRun


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, batch: dict, device: torch.device) -> tuple[float, float]:
    """One forward + backward + AdamW step; returns (loss, seconds)."""
    _sync(device)
    start = time.perf_counter()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    return float(loss.detach()), seconds


def time_round_robin(runs: dict[str, dict], repeats: int, device: torch.device) -> None:
    """Time the training steps of several modes side by side (the benchmark scripts' loop).

    Each run is `{"model", "optimizer", "batches"}` (the same examples in every mode). The first
    batch's step, on the same initial weights in every mode, sets `run["first_loss"]` (the loss check)
    and warms up. Then `repeats` rounds step through the batches, each batch in every mode before the
    next (noise hits every mode alike), and `run["times"][i]` collects batch `i`'s seconds.
    """
    for run in runs.values():
        run["first_loss"], _ = train_step(run["model"], run["optimizer"], run["batches"][0], device)
        run["times"] = [[] for _ in run["batches"]]
    batches = len(next(iter(runs.values()))["batches"])
    for _ in range(repeats):
        for i in range(batches):
            for run in runs.values():
                run["times"][i].append(train_step(run["model"], run["optimizer"], run["batches"][i], device)[1])


def round_robin_summary(runs: dict[str, dict], real_tokens: int) -> dict[str, dict]:
    """Per mode of `time_round_robin`: real tokens/s over the per-batch median step times, the median
    step in seconds, and the first step's loss."""
    summary = {}
    for name, run in runs.items():
        medians = [float(np.median(t)) for t in run["times"]]
        summary[name] = {"tokens_per_s": real_tokens / sum(medians), "median_step_s": float(np.median(medians)),
                         "first_loss": run["first_loss"]}
    return summary


def _optimizer(model, lr: float):
    return torch.optim.AdamW(model.parameters(), lr=lr)


def _warmup_batches(run: ModeRun, warmup: int) -> list[dict]:
    return [run.batches[i % len(run.batches)] for i in range(warmup)]


def _mode_copy(base_model, run: ModeRun):
    """A copy of `base_model` on the mode's attention, in train mode."""
    model = copy.deepcopy(base_model)
    use_backend(model, run.attn_implementation)
    model.train()
    return model


def _reset_for_mode(base_model, init_state: dict, run: ModeRun, device: torch.device) -> None:
    """`base_model` back at the initial weights, on the mode's attention, in train mode, with freed memory
    collected (and, on CUDA, the cache emptied and the peak counter reset)."""
    base_model.load_state_dict(init_state)
    use_backend(base_model, run.attn_implementation)
    base_model.train()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def epoch_loss(model, batches: Sequence[dict]) -> float:
    """Token-mean loss over every target token of `batches` (no gradient, no optimizer step)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            targets = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
            if targets == 0:
                continue
            loss = model(**batch, use_cache=False).loss
            total += float(loss.double()) * targets
            count += targets
    return total / max(count, 1)


def _proc_status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`), so that reusing them counts."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fork_memory_available() -> bool:
    """Peak RSS per mode needs `os.fork` and a resettable peak counter (`/proc/self/clear_refs`, Linux)."""
    return hasattr(os, "fork") and os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


def peak_rss_in_child(fn) -> int:
    """Run `fn()` in a forked child (one thread); return its peak anonymous-memory increase in bytes.

    The child resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), returns free
    heap pages to the OS, notes its anonymous RSS (`RssAnon`), runs `fn`, and reports
    `VmHWM - RssFile - RssShmem - RssAnon_before`: the peak of resident memory less the file-backed
    pages (shared-library code mapped in as the child runs, which a forked child faults in again
    whatever the mode), over the anonymous memory it started with. A fork starts from the parent's
    exact state, so every mode starts from the same memory, and nothing a mode allocates can hide
    another's peak. Assumes no file-backed page is dropped while `fn` runs (a machine not short of memory).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 0
        try:
            os.close(read_end)
            torch.set_num_threads(1)  # OpenMP's pool does not survive fork; as DataLoader workers do
            gc.collect()
            _release_free_heap()
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            before = _proc_status("RssAnon:")
            fn()
            # VmHWM counts file-backed pages too (library code the child maps in as it runs, the same
            # for every mode): take out those still mapped at the end to keep anonymous memory only
            peak = _proc_status("VmHWM:") - _proc_status("RssFile:") - _proc_status("RssShmem:")
            message = json.dumps({"peak": peak - before})
        except BaseException as error:  # report, never fall through into the parent's code
            message = json.dumps({"error": f"{type(error).__name__}: {error}"})
            status = 1
        os.write(write_end, message.encode())
        os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    reply = json.loads(b"".join(chunks) or b'{"error": "the child died without a reply"}')
    if "error" in reply:
        raise RuntimeError(f"memory measurement in a forked child failed: {reply['error']}")
    return int(reply["peak"])


def memory_batches(run: ModeRun, memory_steps: int | None, warmup: int) -> list[dict]:
    """The batches a memory measurement trains on.

    `memory_steps=None` (or 0): the warm-up, then the whole epoch. `k`: the `k` batches computing the
    most tokens, the largest last, so that its step runs with gradients and AdamW state already
    allocated: the epoch's peak, for a fraction of the time.
    """
    if not memory_steps:
        return _warmup_batches(run, warmup) + run.batches
    largest = sorted(range(len(run.batches)), key=lambda i: (run.computed_tokens[i], i))[-memory_steps:]
    if len(largest) < 2:  # one step: run it twice, the second with the optimizer state allocated
        largest = largest * 2
    return [run.batches[i] for i in largest]


def measure_memory_fork(base_model, runs: dict[str, ModeRun], memory_steps, warmup, lr, device, say) -> None:
    """Peak memory of each mode in a forked child (`peak_rss_in_child`) that copies the initial model and
    trains on `memory_batches`; sets `run.peak_mem_bytes`."""
    for run in runs.values():
        def job(run=run):
            model = _mode_copy(base_model, run)
            optimizer = _optimizer(model, lr)
            for batch in memory_batches(run, memory_steps, warmup):
                train_step(model, optimizer, batch, device)

        run.peak_mem_bytes = peak_rss_in_child(job)
        say(f"  memory {run.name:20} {run.peak_mem_bytes / 2**20:9.1f} MiB")


def _schedule(runs: dict[str, ModeRun], repeats: int) -> list[tuple[str, int]]:
    """(mode, batch index) in turn order: each mode at the same fraction of its timed steps."""
    totals = {name: len(run.batches) * repeats for name, run in runs.items()}
    done = dict.fromkeys(runs, 0)
    order = []
    for _ in range(sum(totals.values())):
        name = min((n for n in runs if done[n] < totals[n]), key=lambda n: (done[n] + 0.5) / totals[n])
        order.append((name, done[name] % len(runs[name].batches)))
        done[name] += 1
    return order


def time_interleaved(base_model, runs, warmup, repeats, lr, device, say) -> None:
    """Every mode its own model copy; modes take turns step by step."""
    models, optimizers = {}, {}
    for name, run in runs.items():
        model = _mode_copy(base_model, run)
        models[name], optimizers[name] = model, _optimizer(model, lr)
        run.times = [[] for _ in run.batches]
    for i in range(warmup):
        for name, run in runs.items():
            loss, _ = train_step(models[name], optimizers[name], run.batches[i % len(run.batches)], device)
            run.losses.append(loss)
    order = _schedule(runs, repeats)
    report = max(1, len(order) // 10)
    for k, (name, index) in enumerate(order):
        run = runs[name]
        loss, seconds = train_step(models[name], optimizers[name], run.batches[index], device)
        run.losses.append(loss)
        run.times[index].append(seconds)
        if (k + 1) % report == 0:
            say(f"  timed {k + 1}/{len(order)} steps")
    del models, optimizers


def time_by_mode(base_model, init_state, runs, warmup, repeats, lr, device, measure_cuda_memory, say) -> None:
    """One model, reloaded with the initial weights for each mode; modes one after the other."""
    for name, run in runs.items():
        _reset_for_mode(base_model, init_state, run, device)
        optimizer = _optimizer(base_model, lr)
        run.times = [[] for _ in run.batches]
        for batch in _warmup_batches(run, warmup):
            run.losses.append(train_step(base_model, optimizer, batch, device)[0])
        for _ in range(repeats):
            for index, batch in enumerate(run.batches):
                loss, seconds = train_step(base_model, optimizer, batch, device)
                run.losses.append(loss)
                run.times[index].append(seconds)
        if measure_cuda_memory:
            run.peak_mem_bytes = int(torch.cuda.max_memory_allocated(device))
        del optimizer
        base_model.zero_grad(set_to_none=True)
        say(f"  {name:20} {len(run.batches) * repeats} timed steps, "
            f"{sum(map(sum, run.times)):.2f}s" + (f", peak {run.peak_mem_bytes / 2**30:.2f} GiB" if measure_cuda_memory else ""))
    base_model.load_state_dict(init_state)


def measure_memory_cuda(base_model, init_state, runs, memory_steps, warmup, lr, device, say) -> None:
    """Peak CUDA memory of each mode on its own (see `memory_batches`), when timing interleaved modes."""
    for run in runs.values():
        _reset_for_mode(base_model, init_state, run, device)
        optimizer = _optimizer(base_model, lr)
        for batch in memory_batches(run, memory_steps, warmup):
            train_step(base_model, optimizer, batch, device)
        run.peak_mem_bytes = int(torch.cuda.max_memory_allocated(device))
        del optimizer
        base_model.zero_grad(set_to_none=True)
        say(f"  memory {run.name:20} {run.peak_mem_bytes / 2**30:7.2f} GiB")
    base_model.load_state_dict(init_state)


def check_losses(base_model, runs, check_dtype, device, say) -> dict:
    """Epoch loss of every mode at the initial weights, in `check_dtype`."""
    model = base_model if next(base_model.parameters()).dtype == check_dtype else copy.deepcopy(base_model).to(check_dtype)
    model.eval()
    quiet = logging.getLogger("packcollate")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the fp32 check takes the exact path on CUDA; not worth a warning
    try:
        for run in runs.values():
            use_backend(model, run.attn_implementation)
            run.epoch_loss = epoch_loss(model, run.batches)
            say(f"  epoch loss {run.name:20} {run.epoch_loss:.6f}")
    finally:
        quiet.setLevel(level)
        use_backend(model, "sdpa")
        model.train()
    if model is not base_model:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    values = [run.epoch_loss for run in runs.values()]
    tolerance = EPOCH_LOSS_TOLERANCE.get(check_dtype, 1e-2)
    spread = max(values) - min(values)
    return {"dtype": str(check_dtype).replace("torch.", ""), "tolerance": tolerance, "max_difference": spread,
            "passed": bool(spread <= tolerance), "losses": {name: run.epoch_loss for name, run in runs.items()}}
