"""Write docs/api.md, the API reference, from the docstrings of the public objects.

    python docs/make_api.py          # rewrite docs/api.md
    python docs/make_api.py --check  # exit 1 when docs/api.md is out of date (run by the tests)
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

# (module, [public names]) in reading order: the data path, top to bottom (README, Architecture)
PUBLIC = [
    ("packcollate", ["PackedCollator", "PaddedCollator", "PackedVisionCollator", "CollateStats",
                     "TokenBudgetBatchSampler", "TokenBudgetStream", "prepare", "check_model", "assert_packing_safe"]),
    ("packcollate.errors", ["PackcollateError", "InputError", "MissingKeyError", "InputTypeError", "LayoutError",
                            "UnsupportedError", "BackendRefused", "NotPreparedError", "LaunchError",
                            "PackingUnsafeError"]),
    ("packcollate.layout", ["IGNORE_INDEX", "PACKING_KEYS", "packing_keys", "SequenceLayout", "layout_of_call",
                            "layout_of_inputs", "traced_sequence_ids", "check_cu_seq_lens", "checked_position_ids"]),
    ("packcollate.unwrap", ["unwrap_model", "unwrapped_class"]),
    ("packcollate.collate.lengths", ["plan_lengths"]),
    ("packcollate.collate.labels", ["template_label_mask", "find_template"]),
    ("packcollate.collate.vision", ["PackedVisionCollator", "shield_vision_tower"]),
    ("packcollate.collate.preference", ["PackedPreferenceCollator", "PackedPairCollator"]),
    ("packcollate.batching.lengths", ["token_counts", "length_stats", "LengthStats", "recommend_max_seq_length"]),
    ("packcollate.batching.stream", ["TokenBudgetStream"]),
    ("packcollate.backend", ["describe", "packcollate_attention", "packcollate_mask", "register"]),
    ("packcollate.backend.preparation", ["prepare", "use_backend", "require_prepared"]),
    ("packcollate.backend.restart", ["token_mixers", "internal_attention_layers", "stateful_classes", "uses_kernels",
                                     "run_per_example"]),
    ("packcollate.backend.buckets", ["plan_buckets", "bucket_plan"]),
    ("packcollate.backend.patches", ["prepare_patching_models", "patch_layout", "PatchLayout",
                                     "restarted_hash_embeddings"]),
    ("packcollate.objectives.segments", ["segment_sum", "segment_mean", "segment_last", "segment_last_index",
                                         "token_logprobs", "to_padded", "from_padded", "padding_mask", "segment_ids"]),
    ("packcollate.objectives.losses", ["sequence_weighted_loss", "count_loss_examples", "per_example_token_loss",
                                       "summed_token_loss"]),
    ("packcollate.objectives.scores", ["packed_sequence_logits"]),
    ("packcollate.objectives.rollouts", ["PackedRollouts"]),
    ("packcollate.compat", ["CompatReport", "Finding", "tiny_config", "compare_packed_unpacked", "Equivalence"]),
    ("packcollate.compat.guard", ["assert_packing_safe", "assert_sequence_scores_safe"]),
    ("packcollate.compat.configs", ["context_length"]),
    ("packcollate.integrations", ["PackedTrainer", "PackingTrainerMixin", "PackingGuardCallback", "count_label_tokens", "join_torchrun",
                                  "micro_batches"]),
    ("packcollate.integrations.trl", ["PackedSFTTrainer", "PackedDPOTrainer", "PackedRewardTrainer",
                                      "PackedGRPOTrainer", "PackedRLOOTrainer"]),
    ("packcollate.integrations.trl_rl", ["PackedRolloutsMixin", "checked_reward"]),
    ("packcollate.integrations.preflight", ["check_trainer_keeps_masks", "check_split_lengths", "assert_fsdp_active",
                                            "assert_processes"]),
    ("packcollate.tools.bench", ["run_benchmark"]),
    ("packcollate.tools.toy", ["char_tokenizer", "arithmetic_problems", "load_arithmetic", "tokenize_prompt_completion"]),
]
OUT = Path(__file__).with_name("api.md")
PACKAGE = Path(__file__).resolve().parent.parent / "src" / "packcollate"


def _signature(obj) -> str:
    """The signature, with function defaults shown by name (no memory addresses)."""
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return re.sub(r"<function (\S+) at 0x[0-9a-f]+>", r"\1", text)


def layout() -> list[str]:
    """A table of every module of the package and the first line of its docstring, read from the source
    files (nothing is imported, so optional extras need not be installed)."""
    lines = ["## Package layout", "", "| module | what it owns |", "| --- | --- |"]
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        doc = ast.get_docstring(ast.parse(path.read_text())) or "(no docstring)"
        summary = " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {summary} |")
    return lines + [""]


def render() -> str:
    lines = ["# API reference", "", "Generated from the docstrings by `python docs/make_api.py`; do not edit by hand.", ""]
    lines += layout()
    for module_name, names in PUBLIC:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", ""]
        summary = inspect.getdoc(module)
        if summary:
            lines += [summary.split("\n\n")[0], ""]
        for name in names:
            obj = inspect.unwrap(getattr(module, name))  # functools wrappers (lru_cache) show their function
            if inspect.isclass(obj) or inspect.isfunction(obj):
                kind = "class" if inspect.isclass(obj) else "def"
                lines += [f"### `{kind} {name}{_signature(obj)}`", "", inspect.getdoc(obj) or "(no docstring)", ""]
            else:
                lines += [f"### `{name} = {obj!r}`", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python docs/make_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
