"""The compatibility matrix of causal LMs: every causal-LM architecture of transformers checked in an
isolated worker process (`check_all`), written as docs/compatibility.md/.json; the table and file
helpers the vision-language matrix (`vision_matrix.py`) shares."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..compat.model_check import check_model
from ..compat.proof import available_backends
from ..compat.report import (
    CONTAMINATED,
    EXACT,
    GRAD_TOLERANCE,
    LOGIT_TOLERANCE,
    OK,
    REFERENCE_BACKEND,
    UNSUPPORTED,
)
from ..compat.tiny import PROOF_LENGTHS
from ..errors import one_line
from ..layout import BACKEND_NAME
from .versions import module_versions

ALL_COMMAND = "packcollate check --all --jobs 2 --out docs/"

_DRAFT_MODEL = (
    "a draft model for speculative decoding: every layer reads its target model's key/value cache, so it does "
    "not run on text alone"
)
# causal-LM architectures of transformers that have no verdict here, and why
NO_VERDICT_REASONS = {
    "gemma4_assistant": _DRAFT_MODEL,
    "gemma4_unified_assistant": _DRAFT_MODEL,
    "reformer": "Reformer hashes attention buckets with random rotations and its reversible layers only run "
                "backward in train mode: no deterministic step to compare",
    "gemma3n": "its vision tower needs the optional timm package; its text decoder is checked as gemma3n_text",
}


def check_architecture(model_type: str, backends: Sequence[str] | None = None, device="cpu") -> dict:
    """`check_model(model_type).to_dict()` plus `seconds`; an exception becomes the entry's `error`
    (prefixed with the known reason, `NO_VERDICT_REASONS`, when there is one)."""
    start = time.perf_counter()
    try:
        entry = check_model(model_type, backends=backends, device=device).to_dict()
    except Exception as error:  # noqa: BLE001 - one architecture's failure is its entry
        entry = _failed_entry(model_type, f"could not check: {one_line(error)}", 0.0)
    if entry["error"] and model_type in NO_VERDICT_REASONS:
        entry["error"] = f"{NO_VERDICT_REASONS[model_type]} ({entry['error']})"
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def _worker_loop(conn, check, backends, device, memory_gib: float | None) -> None:
    """A worker process: announce readiness, then check one architecture per message until None."""
    if memory_gib:  # a runaway architecture fails with MemoryError instead of exhausting the machine
        import resource

        limit = int(memory_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("transformers").setLevel(logging.ERROR)
    conn.send("ready")
    while (model_type := conn.recv()) is not None:
        conn.send(check(model_type, backends, device))


class _Worker:
    """One worker process and the architecture it is checking."""

    def __init__(self, context, check, backends, device, memory_gib: float | None):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child, check, backends, device, memory_gib), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task: str | None = None
        self.started = 0.0

    def assign(self, model_type: str) -> None:
        self.task, self.started = model_type, time.monotonic()
        self.conn.send(model_type)

    def death(self) -> str:
        """Why the process ended (after it closed its pipe)."""
        self.process.join(timeout=10)
        code = self.process.exitcode
        if code is None:
            return "stopped answering"
        if code < 0:
            name = signal.Signals(-code).name
            return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        return f"exited with status {code}"

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


def _failed_entry(model_type: str, error: str, seconds: float) -> dict:
    return {"target": model_type, "model_type": model_type, "architecture": "", "findings": [], "backends": [],
            "collator_options": {}, "error": error, "seconds": round(seconds, 2)}


def run_isolated(
    model_types: Sequence[str],
    *,
    backends: Sequence[str] | None = None,
    device="cpu",
    jobs: int = 2,
    timeout: float = 120.0,
    check=check_architecture,
    memory_gib: float | None = 8.0,
    progress: bool = True,
) -> list[dict]:
    """`check(model_type, backends, device) -> dict` for every model type, each in a worker process.

    A model that raises, hangs (more than `timeout` seconds), crashes or runs out of memory costs
    only its own entry (`error` says what happened); a dead or killed worker is replaced. Workers
    are started with `spawn` and limited to `memory_gib` of address space on CPU (None: no limit).
    Returns one entry per model type, in the given order.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")
    limit = memory_gib if torch.device(device).type == "cpu" else None
    pending, results = list(model_types), {}
    workers = [_Worker(context, check, backends, device, limit) for _ in range(min(jobs, len(pending)))]
    failed_starts = 0
    bar = tqdm(total=len(pending), desc="architectures", unit="arch", disable=not progress)
    try:
        while len(results) < len(model_types):
            for worker in workers:
                if worker.ready and worker.task is None and pending:
                    worker.assign(pending.pop(0))
            ready = wait([w.conn for w in workers], timeout=1.0)
            for index, worker in enumerate(workers):
                finished = _poll_worker(worker, worker.conn in ready, timeout)
                if finished is None:
                    continue
                if finished is _DIED and worker.task is None:
                    failed_starts += 1
                    if failed_starts > 3:
                        raise RuntimeError(f"check workers fail to start: the last one {worker.death()}")
                elif finished is not _READY:
                    results[worker.task] = finished
                    worker.task = None
                    bar.update(1)
                    bar.set_postfix_str(finished["model_type"])
                if finished is _DIED or finished.get("error", "").startswith(("timed out", "worker ")):
                    worker.stop()
                    workers[index] = _Worker(context, check, backends, device, limit)
    finally:
        bar.close()
        for worker in workers:
            if worker.process.is_alive() and worker.task is None:
                worker.conn.send(None)
            worker.stop()
    return [results[model_type] for model_type in model_types]


_READY, _DIED = {"ready": True}, {"died": True}


def _poll_worker(worker: _Worker, readable: bool, timeout: float):
    """What happened to `worker`: `_READY`, a finished entry, `_DIED` (no task), or None (nothing)."""
    if readable:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            if worker.task is None:
                return _DIED
            return _failed_entry(worker.task, f"worker {worker.death()}", time.monotonic() - worker.started)
        if message == "ready":
            worker.ready = True
            return _READY
        return message
    if worker.task is not None and time.monotonic() - worker.started > timeout:
        return _failed_entry(worker.task, f"timed out after {timeout:.0f} s", time.monotonic() - worker.started)
    return None


def check_command(default: str) -> str:
    """The command line that is running when it is `packcollate check ...`, else `default` (what to record
    in a matrix made from Python)."""
    return " ".join(["packcollate", *sys.argv[1:]]) if sys.argv[1:2] == ["check"] else default


def matrix_versions() -> dict[str, str]:
    """The versions a matrix records: transformers, torch and Python."""
    return module_versions("transformers", "torch", "python")


def write_matrix(out: str | os.PathLike, stem: str, document: dict, markdown: str) -> None:
    """Write `<stem>.json` (the document) and `<stem>.md` (its table) into folder `out`, made if missing."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(document, indent=1) + "\n")
    (folder / f"{stem}.md").write_text(markdown)


def check_all(
    model_types: Sequence[str] | None = None,
    *,
    backends: Sequence[str] | None = None,
    device="cpu",
    jobs: int = 2,
    timeout: float = 120.0,
    out: str | os.PathLike | None = "docs",
    check=check_architecture,
    progress: bool = True,
    command: str = ALL_COMMAND,
) -> dict:
    """The compatibility matrix: `check_model` on every causal-LM architecture of transformers
    (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, or `model_types`), each isolated (`run_isolated`).

    Writes `compatibility.md` and `compatibility.json` into `out` (None: nothing written) and
    returns the JSON document: command, seconds, versions, summary and one entry per architecture.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_types = list(model_types or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    backends = list(backends) if backends else available_backends(device)
    start = time.perf_counter()
    entries = run_isolated(model_types, backends=backends, device=device, jobs=jobs, timeout=timeout,
                           check=check, progress=progress)
    document = {
        "command": command,
        "seconds": round(time.perf_counter() - start, 1),
        "jobs": jobs,
        "versions": matrix_versions(),
        "device": str(device),
        "backends": backends,
        "tolerances": {"logits": LOGIT_TOLERANCE, "grads": GRAD_TOLERANCE},
        "summary": summarize(entries, backends),
        "architectures": entries,
    }
    if out is not None:
        write_matrix(out, "compatibility", document, format_matrix(document))
    return document


def _entry_verdict(entry: dict, backend: str, use_cache: bool) -> str | None:
    for result in entry.get("backends", []):
        if result["backend"] == backend:
            return next(t["verdict"] for t in result["trials"] if t["use_cache"] == use_cache)
    return None


def summarize(entries: Sequence[dict], backends: Sequence[str]) -> dict:
    """Coverage (architectures with a verdict) and verdict counts per backend and `use_cache`."""
    with_verdict = [e for e in entries if e.get("backends")]
    counts = {}
    for backend in backends:
        for use_cache in (False, True):
            tally: dict[str, int] = {}
            for entry in with_verdict:
                verdict = _entry_verdict(entry, backend, use_cache) or "not run"
                tally[verdict] = tally.get(verdict, 0) + 1
            counts[f"{backend} use_cache={use_cache}"] = tally
    return {
        "architectures": len(entries),
        "with_verdict": len(with_verdict),
        "coverage": round(len(with_verdict) / max(len(entries), 1), 4),
        "counts": counts,
    }


#: A verdict as a table cell (None: no verdict), in both matrices.
VERDICT_LABELS = {EXACT: "exact", CONTAMINATED: "**contaminated**", UNSUPPORTED: "unsupported", None: "–"}


def markdown_row(cells: Sequence[str]) -> str:
    """One row of a markdown table, `|` escaped and newlines folded in every cell."""
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def format_matrix(document: dict) -> str:
    """`compatibility.md`: how it was made, the summary, and one row per architecture."""
    backends, summary = document["backends"], document["summary"]
    versions = document["versions"]
    lines = [
        "# Model compatibility: is packing exact?",
        "",
        "Generated by `packcollate check --all`; do not edit by hand. For each causal-LM architecture of "
        "transformers (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), a tiny random copy of its default config "
        "(`packcollate.compat.tiny_config`: hidden 64, 4 heads, a few layers, windows of 8 tokens) trains one "
        f"packed batch of {len(PROOF_LENGTHS)} examples (lengths {', '.join(map(str, PROOF_LENGTHS))}) and the same "
        f"examples one at a time through `{REFERENCE_BACKEND}`, in fp32 on {document['device']}.",
        "",
        f"- **exact**: max |logit diff| <= {document['tolerances']['logits']:g} and max relative gradient diff "
        f"<= {document['tolerances']['grads']:g} (every parameter);",
        "- **contaminated**: runs, but packed examples see each other (the silent failure);",
        "- **unsupported**: the packed forward/backward raises (the note keeps the error);",
        "- no verdict: the tiny copy could not be built or does not run one example at a time (see notes).",
        "",
        "Columns give the verdict with `use_cache=False` (what `Trainer` uses); `cache` lists the backends that "
        "are contaminated only with `use_cache=True` (the config default in plain loops: transformers ignores "
        "packing for sdpa/eager/flex_attention when a cache exists). `max diff` is the packcollate backend's "
        "(logits, relative gradients).",
        "",
        f"- command: `{document['command']}` ({document['jobs']} worker processes, "
        f"{_duration(document['seconds'])} wall time)",
        f"- transformers {versions['transformers']}, torch {versions['torch']}, Python {versions['python']}",
        f"- coverage: {summary['with_verdict']} of {summary['architectures']} architectures have a verdict "
        f"({100 * summary['coverage']:.1f}%)",
    ]
    for backend in backends:
        for use_cache in (False, True):
            tally = summary["counts"][f"{backend} use_cache={use_cache}"]
            counts = ", ".join(f"{n} {verdict}" for verdict, n in sorted(tally.items(), key=lambda kv: -kv[1]))
            lines.append(f"- {backend}, use_cache={use_cache}: {counts}")
    lines += ["", "| architecture | " + " | ".join(backends) + " | cache | max diff | notes |",
              "| --- | " + " | ".join("---" for _ in backends) + " | --- | --- | --- |"]
    for entry in sorted(document["architectures"], key=lambda e: e["model_type"]):
        lines.append(_matrix_row(entry, backends))
    return "\n".join(lines) + "\n"


def _matrix_row(entry: dict, backends: Sequence[str]) -> str:
    name = f"`{entry['model_type']}`" + (f" {entry['architecture']}" if entry.get("architecture") else "")
    verdicts = [VERDICT_LABELS[_entry_verdict(entry, b, False)] for b in backends]
    cached = [b for b in backends
              if _entry_verdict(entry, b, True) == CONTAMINATED and _entry_verdict(entry, b, False) != CONTAMINATED]
    ours = next((r for r in entry.get("backends", []) if r["backend"] == BACKEND_NAME), None)
    diff = ""
    if ours is not None and ours["trials"][0]["max_logit_diff"] is not None:
        diff = f"{ours['trials'][0]['max_logit_diff']:.0e}, {ours['trials'][0]['max_grad_rel_diff']:.0e}"
    notes = [f["note"] for f in entry.get("findings", []) if f["status"] != OK and f["note"] and f["name"] != "use_cache"]
    if entry.get("error"):
        notes.insert(0, "no verdict: " + entry["error"])
    notes += [f"{r['backend']} {r['note']}" for r in entry.get("backends", [])
              if r["verdict"] == UNSUPPORTED and r["backend"] != "flex_attention" and r["note"]]
    return markdown_row([name, *verdicts, ", ".join(cached), diff, "; ".join(notes)])


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"
