"""The backend under `torch.compile` (`packcollate.backend.traced`): a compiled model on the `packcollate` backend is
exact: packed batches of varying length, a sliding window, and a padded batch give the eager model's loss and
gradients.
Recompile counts and compile times are a benchmark (benchmarks/compile_breaks.py); that a prepared model traces as
one graph is checked here."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

import packcollate  # noqa: F401
from packcollate import PackedCollator, PaddedCollator

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, use_cache=False)


def examples(seed: int, k: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, 128, int(n)).tolist()} for n in rng.integers(3, 40, k)]


def assert_compiled_equals_eager(model, batches):
    torch.manual_seed(0)
    compiled = torch.compile(copy.deepcopy(model), backend="eager", dynamic=True)
    for batch in batches:
        out, reference = compiled(**batch), model(**batch)
        out.loss.backward()
        reference.loss.backward()
        assert abs(float(out.loss - reference.loss)) < 1e-5
        for (name, p), q in zip(compiled.named_parameters(), model.parameters()):
            assert float((p.grad - q.grad).norm() / q.grad.norm()) < 1e-5, name
            p.grad = q.grad = None


@pytest.mark.parametrize("config", [LlamaConfig(**TINY), MistralConfig(**TINY, sliding_window=8)], ids=["llama", "window"])
def test_compiled_packed_model_equals_eager(config):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="packcollate")
    assert_compiled_equals_eager(model, [PackedCollator()(examples(seed, k)) for seed, k in [(0, 5), (1, 9), (2, 3)]])


def test_compiled_padded_batch_equals_eager():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="packcollate")
    batch = PaddedCollator()(examples(3, 4))
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # real padding
    assert_compiled_equals_eager(model, [batch])


def test_a_prepared_model_traces_as_one_graph(monkeypatch):
    """`packcollate.prepare` knows the model's needs before any forward, so the mask function's check is a
    dict lookup Dynamo traces: one graph, no break (what benchmarks/compile_breaks.py counts per step)."""
    from packcollate.backend import restart

    monkeypatch.setattr(restart, "_STATEFUL", {})  # as in a fresh process: nothing known before `prepare`
    torch.manual_seed(0)
    model = packcollate.prepare(AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="packcollate"))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**PackedCollator()(examples(0, 5)))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
