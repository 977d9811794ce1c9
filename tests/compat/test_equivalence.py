"""`compare_packed_unpacked` (`packcollate.compat.equivalence`): packed batches train exactly like padded ones on a
real transformers architecture.

A tiny random Llama (CPU, fp32) built from a config; the packed batch goes through transformers'
own sdpa and eager attention (which detect packing from `position_ids` when no cache exists).
Logits, loss and every parameter's gradient must equal the padded batch's and the
one-example-at-a-time run's.
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from packcollate import PackedCollator
from packcollate.compat import compare_packed_unpacked

LENGTHS = [5, 17, 9, 30, 2, 12]


def tiny_llama(attn_implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def examples(completion_only: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    features = []
    for length in LENGTHS:
        feature = {"input_ids": rng.integers(0, 128, length).tolist()}
        if completion_only:
            prompt = length // 2
            feature["completion_mask"] = [0] * prompt + [1] * (length - prompt)
        features.append(feature)
    return features


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("reference", ["padded", "unpacked"])
@pytest.mark.parametrize("completion_only", [False, True])
def test_packed_equals_reference(attn_implementation, reference, completion_only):
    model = tiny_llama(attn_implementation)
    result = compare_packed_unpacked(model, examples(completion_only), reference=reference, use_cache=False)
    assert result.max_logit_diff < 1e-5
    assert result.loss_diff < 1e-5
    assert result.max_grad_rel_diff < 1e-5, result.worst_parameter


def test_completion_only_changes_the_loss():
    """The completion mask really reaches the loss (guards against a vacuous equivalence)."""
    model = tiny_llama("sdpa")
    full = compare_packed_unpacked(model, examples(False))
    completion = compare_packed_unpacked(model, examples(True))
    assert abs(full.loss - completion.loss) > 1e-3


def test_separator_keeps_examples_from_predicting_each_other():
    """Without the -100 at each example start, the packed loss would include cross-example targets."""
    model = tiny_llama("sdpa")
    exact = compare_packed_unpacked(model, examples(False))
    leaky = compare_packed_unpacked(model, examples(False), collator=PackedCollator(separator_id=1))
    assert exact.loss_diff < 1e-5
    assert leaky.loss_diff > 1e-3


def test_transformers_sdpa_mixes_examples_when_a_cache_exists():
    """The pitfall DESIGN.md records: with use_cache=True, sdpa ignores the packing (transformers 5.x)."""
    model = tiny_llama("sdpa")
    result = compare_packed_unpacked(model, examples(False), use_cache=True)
    assert result.max_logit_diff > 1e-2
