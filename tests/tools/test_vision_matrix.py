"""The vision-language matrix (`packcollate.tools.vision_matrix`): each family's entry gives every backend a
verdict per `use_cache`, judged by the proof's own rule (`compat.proof.trial_of`), and the table shows it."""

import pytest

from packcollate.compat.report import CONTAMINATED, EXACT
from packcollate.tools.vision_matrix import check_vision_architecture, format_vision_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


def test_entry_tells_exact_from_contaminated():
    entry = check_vision_architecture("qwen2_vl", backends=["packcollate", "sdpa"])
    assert entry["error"] is None and entry["rope_index"]
    verdicts = {backend: [t["verdict"] for t in trials] for backend, trials in entry["backends"].items()}
    # sdpa with a cache builds its own 4-D mask over the whole packed row: the examples see each other
    assert verdicts == {"packcollate": [EXACT, EXACT], "sdpa": [EXACT, CONTAMINATED]}
    assert entry["backends"]["sdpa"][1]["max_logit_diff"] > 1e-4
    document = {"backends": ["packcollate", "sdpa"], "versions": {"transformers": "t", "torch": "t", "python": "p"},
                "command": "test", "seconds": 1.0, "tolerances": {"logits": 1e-4, "grads": 1e-3},
                "architectures": [entry], "not_covered": []}
    assert "| exact / exact | exact / **contaminated** |" in format_vision_matrix(document)
