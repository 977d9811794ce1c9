"""`packcollate check --task image-text-to-text`: the vision-language compatibility matrix.

`check_vision_architecture("qwen2_vl")` builds a tiny random copy of the family
(`packcollate.compat.vision.tiny_vision_model`), makes its proof examples (images of mixed sizes,
uneven text, one text-only example) and, per attention backend and `use_cache`, compares one packed
forward + backward (`PackedVisionCollator`) against every example on its own through transformers'
reference attention (`compare_vision_packed_unpacked`). `write_vision_matrix` does it for every family
of `VISION_FAMILIES` and writes docs/compatibility-vlm.md/.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import torch

from ..collate.vision import (
    BIDIRECTIONAL_BLOCKS,
    MODEL_MASKED_BLOCKS,
    PackedVisionCollator,
)
from ..compat.proof import available_backends, trial_of
from ..compat.report import (
    EXACT,
    GRAD_TOLERANCE,
    LOGIT_TOLERANCE,
    UNSUPPORTED,
)
from ..compat.vision import (
    TASK,
    VISION_FAMILIES,
    compare_vision_packed_unpacked,
    tiny_vision_model,
    vision_proof_features,
)
from ..errors import one_line
from ..layout import BACKEND_NAME
from .matrix import (
    VERDICT_LABELS,
    check_command,
    markdown_row,
    matrix_versions,
    write_matrix,
)


class _MeasuringCollator(PackedVisionCollator):
    """`PackedVisionCollator` that builds the bidirectional-block batches it refuses for a model on another
    backend: the matrix measures what that backend does with them."""

    def attention_backend(self) -> str:
        return BACKEND_NAME


def _trial(model, features, backend: str, use_cache: bool) -> dict:
    """One backend and `use_cache`: the verdict (exact / contaminated / unsupported) and the differences."""
    try:
        with torch.random.fork_rng():
            model.set_attn_implementation(backend)
            result = compare_vision_packed_unpacked(model, features, collator=_MeasuringCollator(model=model),
                                                    use_cache=use_cache)
    except Exception as error:  # noqa: BLE001 - a backend that raises is "unsupported", with the error
        return {"use_cache": use_cache, "verdict": UNSUPPORTED, "note": one_line(error)}
    verdict = trial_of(use_cache, result, (LOGIT_TOLERANCE, GRAD_TOLERANCE)).verdict
    return {"use_cache": use_cache, "verdict": verdict,
            "max_logit_diff": result.max_logit_diff, "max_grad_rel_diff": result.max_grad_rel_diff,
            "worst_parameter": result.worst_parameter, "loss_diff": result.loss_diff}


def check_vision_architecture(model_type: str, backends: Sequence[str] | None = None,
                              token_type_ids: bool = False) -> dict:
    """Matrix entry of one image-text-to-text family: per backend and `use_cache`, packed vs unpacked.

    `token_type_ids`: the examples carry the processor's bidirectional image-token marks (Gemma 3: image-token
    marks; PaliGemma: prefix marks)."""
    start = time.perf_counter()
    entry: dict = {"model_type": model_type, "task": TASK, "backends": {}, "error": None,
                   "variant": "token_type_ids" if token_type_ids else None}
    try:
        model = tiny_vision_model(model_type)
        features = vision_proof_features(model.config, token_type_ids=token_type_ids)
        entry["architecture"] = type(model).__name__
        entry["rope_index"] = PackedVisionCollator(model=model).rope_owner is not None
        for backend in backends or available_backends("cpu"):
            entry["backends"][backend] = [_trial(model, features, backend, use_cache) for use_cache in (False, True)]
    except Exception as error:  # noqa: BLE001 - a family that cannot be built is its entry
        entry["error"] = one_line(error)
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def _uncovered_families() -> list[str]:
    """transformers' image-text-to-text families without a tiny copy here (read at run time)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return sorted(set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) - set(VISION_FAMILIES))


def vision_matrix(backends: Sequence[str] | None = None, command: str = "") -> dict:
    """Every family of `VISION_FAMILIES` checked, plus the families of transformers not covered."""
    start = time.perf_counter()
    entries = [check_vision_architecture(model_type, backends) for model_type in VISION_FAMILIES]
    entries += [check_vision_architecture(model_type, backends, token_type_ids=True)
                for model_type in (*BIDIRECTIONAL_BLOCKS, *MODEL_MASKED_BLOCKS)]
    backends = list(entries[0]["backends"]) if entries and entries[0]["backends"] else list(backends or [])
    return {
        "task": TASK, "command": command, "device": "cpu", "backends": backends,
        "tolerances": {"logits": LOGIT_TOLERANCE, "grads": GRAD_TOLERANCE}, "reference": "eager, one example at a time",
        "versions": matrix_versions(),
        "seconds": round(time.perf_counter() - start, 1),
        "architectures": entries,
        "not_covered": _uncovered_families(),
    }


def _verdict(entry: dict, backend: str, use_cache: bool) -> str | None:
    return next((t["verdict"] for t in entry["backends"].get(backend, []) if t["use_cache"] == use_cache), None)


def format_vision_matrix(document: dict) -> str:
    """`compatibility-vlm.md`: how it was made and one row per family."""
    backends = document["backends"]
    versions = document["versions"]
    lines = [
        "# Vision-language models: is packing exact?",
        "",
        f"Generated by `{document['command']}`; do not edit by hand. For each image-text-to-text family below, a "
        "tiny random copy (`packcollate.compat.vision.tiny_vision_config`: text hidden 64, 2 vision layers, 2-8 px "
        "patches) trains one packed batch of 4 examples built by `PackedVisionCollator` (images of mixed sizes, "
        "uneven text, one example without images; Qwen-family pixels from a locally built `Qwen2VLImageProcessor`) "
        "and the same examples one at a time through `eager`, where the model computes its own positions "
        "(`get_rope_index` for multi-section rotary families), in fp32 on cpu.",
        "",
        f"- **exact**: max |logit diff| <= {document['tolerances']['logits']:g} and max relative gradient diff "
        f"<= {document['tolerances']['grads']:g} (every parameter, vision tower included);",
        "- **contaminated**: runs, but packed examples (or images) see each other; **unsupported**: raises.",
        "- Columns: verdict with `use_cache=False` / `use_cache=True`.",
        f"- transformers {versions['transformers']}, torch {versions['torch']}, Python {versions['python']}; "
        f"{document['seconds']:.0f} s wall time",
        "- `gemma3` and `paligemma` have two rows: without `token_type_ids` (causal, like text) and with the "
        "processor's `token_type_ids` (Gemma 3: the tokens of one image see each other in both directions; PaliGemma: "
        "the prefix, image and prompt, does; the reference sees the same marks). With them, `PackedVisionCollator` "
        "emits Gemma 3's block ids (`bidirectional_block_ids`), which only the `packcollate` backend reads; it "
        "refuses such batches for a model on another backend (the other columns measure what that backend would do "
        "with them). PaliGemma's marks stay `token_type_ids`: the model masks its own prefix, exact on every backend "
        "(its text layers are flagged non-causal, so the `packcollate` backend hands them transformers' own mask).",
        "- `mistral3` (Pixtral tower), `llava_next`, `llava_onevision` (any-resolution tiles): images of different "
        "sizes (tile counts) in different examples, zero-padded to the largest by the collator (the model cuts each "
        "back to its `image_sizes`).",
        "",
        "| family | model class | rotary | " + " | ".join(backends) + " | max diff (packcollate) | notes |",
        "| --- | --- | --- | " + " | ".join("---" for _ in backends) + " | --- | --- |",
    ]
    for entry in document["architectures"]:
        variant = f" + `{entry['variant']}`" if entry.get("variant") else ""
        cells = [f"`{entry['model_type']}`{variant}", entry.get("architecture", ""),
                 "multi-section (get_rope_index)" if entry.get("rope_index") else "1-D"]
        cells += [f"{VERDICT_LABELS[_verdict(entry, b, False)]} / {VERDICT_LABELS[_verdict(entry, b, True)]}"
                  for b in backends]
        ours = next((t for t in entry["backends"].get("packcollate", []) if "max_logit_diff" in t), None)
        cells.append(f"{ours['max_logit_diff']:.0e}, {ours['max_grad_rel_diff']:.0e}" if ours else "")
        notes = [f"{b}: {t['note'][:100]}" for b, trials in entry["backends"].items() for t in trials[:1] if t.get("note")]
        cells.append("; ".join(([f"no verdict: {entry['error']}"] if entry.get("error") else []) + notes))
        lines.append(markdown_row(cells))
    lines += ["", f"Not covered yet ({len(document['not_covered'])} image-text-to-text families of transformers without "
              "a tiny image builder here; `PackedVisionCollator` may still pack them, unproven): "
              + ", ".join(f"`{m}`" for m in document["not_covered"]), ""]
    return "\n".join(lines)


def write_vision_matrix(out: str, backends: Sequence[str] | None = None, command: str = "") -> dict:
    """Check every family and write `compatibility-vlm.md` / `.json` into folder `out`."""
    document = vision_matrix(backends, command)
    write_matrix(out, "compatibility-vlm", document, format_vision_matrix(document))
    return document


def main(args) -> int:
    """`packcollate check --task image-text-to-text [FAMILY | --all]`: 0 when the first backend is exact."""
    if args.all:
        command = check_command(f"packcollate check --task {TASK} --all --out docs/")
        write_vision_matrix(args.out, args.backends, command)
        return 0
    if args.model not in VISION_FAMILIES:
        raise ValueError(f"packcollate check --task {TASK}: expected one of {VISION_FAMILIES} (tiny copies built "
                         f"here) or --all, got {args.model!r}")
    # a family with bidirectional image blocks is checked with and without its processor's marks
    entries = [check_vision_architecture(args.model, args.backends, token_type_ids=marks)
               for marks in ((False, True) if args.model in (*BIDIRECTIONAL_BLOCKS, *MODEL_MASKED_BLOCKS) else (False,))]
    for entry in entries:
        name = args.model + (f" + {entry['variant']}" if entry["variant"] else "")
        if args.json:
            print(json.dumps(entry, indent=2))
            continue
        for backend, trials in entry["backends"].items():
            for t in trials:
                detail = t.get("note") or f"logits {t['max_logit_diff']:.1e}, grads {t['max_grad_rel_diff']:.1e}"
                print(f"{name} {backend:>12} use_cache={t['use_cache']!s:<5} {t['verdict']:<12} {detail}")
        if entry["error"]:
            print(f"{name}: no verdict: {entry['error']}")
    first = (args.backends or ["packcollate"])[0]
    return 0 if all(_verdict(entry, first, False) == EXACT for entry in entries) else 1
