"""The proof: is a packed batch exactly equivalent to the same examples unpacked, on this architecture?

- `tiny_config` (tiny.py) shrinks any causal-LM config to a few-thousand-parameter copy that keeps its
  structure (attention pattern, GQA ratio, sliding windows, softcapping, experts, layer types);
  `seeded` builds tiny copies without touching the caller's random stream.
- `compare_packed_unpacked` (equivalence.py) runs one packed forward and backward and the reference
  (each sequence on its own, or a padded batch, optionally through another attention backend) on the
  same model, and returns the largest differences of logits, loss and every parameter's gradient.
- `check_model` (model_check.py) runs the static checks (static_checks.py) and that proof
  (proof.py) for every attention backend on a tiny copy of an architecture; `CompatReport`
  (report.py) holds the verdicts. configs.py reads a local `config.json` as data, remote_code.py
  refuses code that was not trusted, vision.py proves vision-language families.
- `assert_packing_safe` / `assert_sequence_scores_safe` (guard.py) are the runtime checks for
  training loops and trainers.
- The matrices of every architecture (`packcollate check --all`) are tools: `packcollate.tools.matrix`.
"""

from ..errors import BackendRefused
from .equivalence import Equivalence, compare_packed_unpacked
from .guard import assert_packing_safe
from .model_check import check_model
from .proof import available_backends, backend_unavailable
from .report import (
    CONTAMINATED,
    ERROR,
    EXACT,
    OK,
    UNSUPPORTED,
    WARNING,
    BackendResult,
    CompatReport,
    Finding,
    Trial,
)
from .static_checks import (
    check_context_length,
    check_layout_route,
    check_position_ids,
    check_position_offset,
    check_recurrent_layers,
    check_rope_sections,
    check_use_cache,
)
from .tiny import proof_features, tiny_config

__all__ = [
    "CONTAMINATED", "ERROR", "EXACT", "OK", "UNSUPPORTED", "WARNING",
    "BackendRefused", "BackendResult", "CompatReport", "Equivalence", "Finding", "Trial",
    "assert_packing_safe", "available_backends", "backend_unavailable", "check_context_length", "check_layout_route", "check_model", "check_position_ids",
    "check_position_offset", "check_recurrent_layers", "check_rope_sections", "check_use_cache",
    "compare_packed_unpacked", "proof_features", "tiny_config",
]
