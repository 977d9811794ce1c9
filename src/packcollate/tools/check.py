"""`packcollate check`: one model, or every causal-LM architecture of transformers, each in an isolated
worker process, written as docs/compatibility.md/.json."""

from __future__ import annotations

import json
import sys

from ..compat.configs import config_file, read_config_json
from ..compat.equivalence import checked_device
from ..compat.model_check import check_model
from ..compat.vision import TASK as VISION_TASK
from ..compat.vision import VISION_FAMILIES
from ..errors import check_positive_int
from ..layout import BACKEND_NAME
from . import vision_matrix
from .matrix import ALL_COMMAND, check_all, check_command


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL_OR_PATH_OR_TYPE",
                        help="a model type (llama), a directory with config.json, or a model id in the local HF cache")
    parser.add_argument("--backend", action="append", dest="backends", metavar="B",
                        help="attention backend to prove (repeatable; default: every available one); the exit "
                             "status follows the first (default packcollate)")
    parser.add_argument("--max-seq-length", type=int, help="the longest example you plan to train on")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the config's own code")
    parser.add_argument("--device", default="cpu", help="where the tiny copy runs (default cpu)")
    parser.add_argument("--all", action="store_true",
                        help="every architecture of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, isolated")
    parser.add_argument("--jobs", type=int, default=2, help="--all: worker processes (default 2)")
    parser.add_argument("--out", default="docs", help="--all: folder for compatibility.md/.json (default docs)")
    parser.add_argument("--timeout", type=float, default=120.0, help="--all: seconds per architecture (default 120)")
    parser.add_argument("--task", default=None, choices=("text-generation", "image-text-to-text"),
                        help="image-text-to-text: vision-language families, packed by PackedVisionCollator; --all "
                             "writes compatibility-vlm.md/.json (default: read from the model's config: "
                             "image-text-to-text for a vision-language family without a causal-LM head, else "
                             "text-generation)")


def detected_task(model: str | None) -> str:
    """The task `packcollate check MODEL` checks when `--task` is not given: `image-text-to-text` for a
    vision-language family (a model type, or a config.json naming one) that has no causal-LM class of its
    own (Qwen2-VL, LLaVA, …), else `text-generation` (Gemma 3 and Qwen3.5 have both and stay text)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = model
    if model is not None and config_file(model) is not None:
        model_type = read_config_json(model).get("model_type")  # read as data: no remote code runs
    if model_type in VISION_FAMILIES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return VISION_TASK
    return "text-generation"


def _checked_flags(args) -> None:
    """Numbers and the device refused in one line before anything is built."""
    checked_device(args.device)
    if args.max_seq_length is not None:
        check_positive_int("--max-seq-length", args.max_seq_length)
    check_positive_int("--jobs", args.jobs)
    if not args.timeout > 0:
        raise ValueError(f"--timeout: expected a positive number of seconds, got {args.timeout!r}")


def main(args) -> int:
    """0 when the chosen backend is exact (or, with --all, when the matrix was written), else 1."""
    if args.all == (args.model is not None):
        print("packcollate check: expected MODEL_OR_PATH_OR_TYPE or --all, got "
              + ("both" if args.all else "neither"), file=sys.stderr)
        return 2
    _checked_flags(args)
    if args.task is None:
        args.task = "text-generation" if args.all else detected_task(args.model)
        if args.task == VISION_TASK:
            model_type = read_config_json(args.model).get("model_type") if config_file(args.model) else args.model
            if not args.json:  # --json prints JSON only
                print(f"packcollate check: {model_type} is a vision-language family: checked as --task {VISION_TASK} "
                      f"(PackedVisionCollator, the family's tiny copy)")
            args.model = model_type
    if args.task == VISION_TASK:
        return vision_matrix.main(args)
    if args.all:
        check_all(backends=args.backends, jobs=args.jobs, timeout=args.timeout, out=args.out, device=args.device,
                  command=check_command(ALL_COMMAND))
        return 0
    report = check_model(args.model, backends=args.backends, device=args.device,
                         max_seq_length=args.max_seq_length, trust_remote_code=args.trust_remote_code)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    chosen = args.backends[0] if args.backends else BACKEND_NAME
    return 0 if report.ok_for(chosen) else 1
