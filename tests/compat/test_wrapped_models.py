"""Models as users train them: LoRA (PEFT) and torch.compile around the model.

The packing guard and `check_model` see through every wrapper (`packcollate.unwrap`): exact setups pass, and a
contaminating one (sdpa with a cache) is still refused through the wrapper. Unwrapping itself: tests/test_unwrap.py;
LoRA training through `PackedTrainer` / `PackedSFTTrainer`: integrations/test_trainer.py, integrations/test_trl.py.
"""

import pytest

peft = pytest.importorskip("peft")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

import packcollate  # noqa: E402,F401
from packcollate.compat import assert_packing_safe, check_model  # noqa: E402
from tests.helpers import lora_config, lora_model, tiny_model  # noqa: E402


@pytest.mark.parametrize("wrap", ["peft", "compile"])
def test_guard_proves_wrapped_models(wrap):
    """Exact setups pass; a contaminating one (sdpa with a cache) is still refused through the wrapper."""

    def wrapped(attn):
        model = tiny_model(attn)
        return get_peft_model(model, lora_config()) if wrap == "peft" else torch.compile(model, backend="eager")

    assert_packing_safe(wrapped("packcollate"), use_cache=True)
    with pytest.raises(RuntimeError, match="packed batches are not safe for LlamaForCausalLM with attn_implementation='sdpa'"):
        assert_packing_safe(wrapped("sdpa"), use_cache=True)


def test_check_model_of_a_peft_model():
    report = check_model(lora_model(), backends=["packcollate"])
    assert report.architecture == "LlamaForCausalLM"
    assert report.ok_for("packcollate", use_cache=True)
