"""`check_model` (`packcollate.compat.model_check`): the numeric proof on a tiny copy of an architecture, per
attention backend and `use_cache`, and its report: exact, contaminated only with a cache, unsupported with the
backend's error kept; RoBERTa proven with its position offset.

Every model is a tiny random copy built from a config (CPU, fp32, nothing downloaded). The full
matrix over every architecture of transformers is a documented command (`packcollate check --all`,
docs/compatibility.md), not a test.
"""

import json

import pytest
from transformers import AutoModelForCausalLM

from packcollate.compat import (
    CONTAMINATED,
    EXACT,
    UNSUPPORTED,
    check_model,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_llama_is_exact_with_packcollate_and_sdpa_without_cache():
    report = check_model("llama", backends=["sdpa", "packcollate"])
    assert report.architecture == "LlamaForCausalLM" and not report.error
    packcollate_result, sdpa = report.result("packcollate"), report.result("sdpa")
    assert [t.verdict for t in packcollate_result.trials] == [EXACT, EXACT]
    assert packcollate_result.trial(False).max_logit_diff < 1e-5
    assert report.ok_for("packcollate")
    # sdpa: exact without a cache, contaminated with one (transformers ignores packing then)
    assert sdpa.trial(False).verdict == EXACT and sdpa.trial(True).verdict == CONTAMINATED
    assert sdpa.trial(True).max_logit_diff > 1e-2
    assert sdpa.verdict == CONTAMINATED and sdpa.note == "contaminated only with use_cache=True"
    assert report.ok_for("sdpa", use_cache=False) and not report.ok_for("sdpa")
    table = report.format_table()
    assert "contaminated only with use_cache=True" in table and "static checks:" in table
    assert json.loads(json.dumps(report.to_dict()))["backends"][1]["verdict"] == EXACT


def refuses_backend(model_type: str, backend: str) -> bool:
    """Whether transformers refuses to build `model_type` with `backend` (read at run time: Gemma 2
    refuses sdpa in transformers 5.23 and 5.24, not in 5.17)."""
    try:
        AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=backend)
    except ValueError:
        return True
    return False


def test_unsupported_backends_keep_the_error():
    report = check_model("gemma2", backends=["sdpa", "flex_attention", "packcollate"])
    sdpa, flex = report.result("sdpa"), report.result("flex_attention")
    if refuses_backend("gemma2", "sdpa"):
        assert sdpa.verdict == UNSUPPORTED and "does not support" in sdpa.note
    else:
        assert sdpa.verdict != UNSUPPORTED, sdpa.note
    assert flex.verdict == UNSUPPORTED and flex.trial(False).error  # no flex backward on CPU
    assert "\n" not in flex.trial(False).error and "\n" not in sdpa.trial(False).error
    assert report.verdict("packcollate") == EXACT


def test_roberta_is_proven_with_its_position_offset():
    report = check_model("roberta", backends=["packcollate"])
    assert report.collator_options["position_ids_start"] == 2
    assert report.verdict("packcollate") == EXACT


@pytest.mark.parametrize(("options", "fragment"), [
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads: expected a divisor of num_attention_heads=4"),
    ({"num_attention_heads": 2, "max_position_embeddings": 0}, "max_position_embeddings: expected a positive int"),
])
def test_an_inconsistent_config_gets_no_verdict(options, fragment):
    """The tiny copy would repair such a config and prove another architecture exact: refused instead."""
    from transformers import LlamaConfig

    from packcollate.compat import check_model

    config = LlamaConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1, vocab_size=64)
    for key, value in options.items():  # after validation: a loaded config can hold anything
        setattr(config, key, value)
    with pytest.raises(ValueError, match=fragment):
        check_model(config)


@pytest.mark.parametrize("device", ["quantum", "tpu"])
def test_an_unknown_device_is_named(device):
    from packcollate.compat import check_model

    with pytest.raises(ValueError, match=f"device: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got '{device}'"):
        check_model("llama", device=device)
