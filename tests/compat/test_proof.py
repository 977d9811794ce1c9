"""The proof's trials (`packcollate.compat.proof`): the half-precision trial runs on a copy, so the trials after
it see the shared model's unrounded fp32 weights."""

import pytest
import torch

from packcollate import PackedCollator
from packcollate.compat import EXACT, proof_features, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_half_precision_trial_leaves_the_shared_model_untouched():
    """The bf16 trial (flash-attn backends, CUDA) runs on a copy: later fp32 trials see unrounded weights."""
    from transformers import LlamaForCausalLM

    from packcollate.compat import proof as proofs

    model = proofs.tiny_model(LlamaForCausalLM, tiny_config("llama"), "cpu")
    proof = proofs.prepare_proof(model, proof_features(), PackedCollator(), torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    trial = proofs.half_precision_trial(model, proof, use_cache=False)  # on eager here: any backend will do
    assert trial.verdict == EXACT
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert proofs.prove_backend(model, proof, "packcollate").trial(False).verdict == EXACT


def test_the_flex_attention_probe_leaves_the_callers_random_state_as_it_was():
    """[17] H7: the probe drew its query from the global generator (`torch.randn`)."""
    from packcollate.compat import backend_unavailable

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    backend_unavailable("flex_attention")
    assert torch.equal(torch.get_rng_state(), before)
