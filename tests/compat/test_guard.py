"""The runtime guard (`packcollate.compat.guard`): `assert_packing_safe` proves a model's own setup before training
(sdpa with a cache refused, the packcollate backend passed; recurrent mixers restarted by packcollate passed,
eager refused), and `assert_sequence_scores_safe` proves sequence-classification scores per packed example.

Through wrappers: test_wrapped_models.py; in a `Trainer`: integrations/test_trainer.py, integrations/test_callbacks.py.
"""

import pytest
import torch

import packcollate
from packcollate.compat import assert_packing_safe, tiny_config
from packcollate.compat.guard import assert_sequence_scores_safe
from tests.helpers import CLASSIFIER_FAMILIES as FAMILIES
from tests.helpers import build_prepared as build
from tests.helpers import classifier_pair
from tests.helpers import tiny_eager_model as tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_guard_raises_for_a_contaminating_setup_and_passes_for_packcollate():
    sdpa = tiny_model("llama", attn_implementation="sdpa")  # config.use_cache=True, the default
    with pytest.raises(RuntimeError, match=r"LlamaForCausalLM with attn_implementation='sdpa' and use_cache=True"):
        assert_packing_safe(sdpa)
    assert_packing_safe(sdpa, use_cache=False)  # what Trainer uses: exact
    assert_packing_safe(tiny_model("llama", attn_implementation="packcollate"))


def test_guard_passes_packcollate_and_stops_eager():
    """The runtime guard proves the model's own setup: packcollate restarts the mixers, eager mixes."""
    packcollate.assert_packing_safe(build("mamba2"), use_cache=False)
    with pytest.raises(RuntimeError, match="attn_implementation='packcollate'"):
        packcollate.assert_packing_safe(build("mamba2", attn_implementation="eager"), use_cache=False)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_scoring_guard_passes_on_the_packcollate_backend(model_type):
    _, packed_model = classifier_pair(model_type, dtype=torch.float32)
    assert assert_sequence_scores_safe(packed_model) < 1e-4


def test_proofs_leave_the_callers_random_stream_alone():
    """The tiny copies are built from seed 0 inside a forked generator: after a guard or a check, dropout
    and sampling follow the user's own seed (they used to continue from seed 0)."""
    from packcollate.compat import check_model

    user_model = tiny_model("qwen2", attn_implementation="packcollate", initializer_range=0.0123)  # a config no proof has seen
    classifier = classifier_pair("llama", dtype=torch.float32)[1]
    for prove in (lambda: assert_packing_safe(user_model), lambda: check_model("llama", backends=["eager"]),
                  lambda: assert_sequence_scores_safe(classifier)):
        torch.manual_seed(1234)
        expected = torch.rand(4)
        torch.manual_seed(1234)
        prove()
        assert torch.equal(torch.rand(4), expected)


def test_scoring_guard_prepares_its_tiny_copy():
    """A classifier whose attention is computed inside the model (BLOOM) is proven on a prepared tiny copy."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("bloom", num_labels=1, pad_token_id=0, use_cache=False)
    model = packcollate.prepare(AutoModelForSequenceClassification.from_config(config, attn_implementation="packcollate"))
    assert assert_sequence_scores_safe(model) < 1e-4
