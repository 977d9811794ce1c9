"""Tiny copies of architectures (`packcollate.compat.tiny`): properties without setters, nested sub-configs, MLA,
Mamba heads, per-layer and composite configs all shrink to a small model that runs forward and backward."""

import pytest
import torch
from transformers import AutoConfig

from packcollate.compat import proof_features
from packcollate.tools.matrix import check_architecture
from tests.helpers import tiny_eager_model as tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_copies_of_architectures_that_needed_care():
    """Properties without setters (Falcon), nested sub-configs (DBRX), MLA (DeepSeek-V3), Mamba heads
    (Bamba, Zamba2), per-layer configs (Gemma 4) and composite configs (MusicGen's decoder)."""
    for model_type in ("falcon", "dbrx", "deepseek_v3", "bamba", "zamba2", "gemma4_text"):
        model = tiny_model(model_type)
        assert sum(p.numel() for p in model.parameters()) < 2_000_000, model_type
        model(input_ids=torch.tensor([proof_features()[1]["input_ids"]]), use_cache=False).logits.sum().backward()


def test_tiny_copy_of_a_composite_config():
    """MusicGen's config nests its decoder's: the tiny copy is proven on the decoder part."""
    try:
        AutoConfig.for_model("musicgen")
    except Exception as error:  # noqa: BLE001 - read at run time: transformers 5.17's default does not validate
        pytest.skip(f"this transformers cannot build MusicGen's default config: {type(error).__name__}")
    assert check_architecture("musicgen", backends=["eager"])["backends"]


def test_a_declared_layer_count_costs_nothing():
    """A config declaring millions of layers (10**9 made `check` allocate 8 GB first) shrinks to two without a
    list of that length: time and memory do not grow with the declared count."""
    import time
    import tracemalloc

    from transformers import LlamaConfig

    from packcollate.compat import tiny_config

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=64,
                         num_hidden_layers=3 * 10**6)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        tiny = tiny_config(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tiny.num_hidden_layers == 2
    assert peak < 2 * 10**6, peak  # 3 M list entries alone would take 24 MB
    assert time.perf_counter() - start < 5
