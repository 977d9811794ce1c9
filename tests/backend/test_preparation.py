"""`import packcollate` patches nothing; `packcollate.prepare(model)` changes that one model, and the
packed layout travels with each call (`packcollate.backend.preparation`).

- Importing packcollate leaves transformers' classes and tables as they were (checked in a fresh
  interpreter), and loads no CLI, benchmark, matrix or toy code.
- A model that needs preparing and was not refuses its first forward on the backend, in one line.
- The layout is per call: two packed forwards before one backward under gradient checkpointing, a
  teacher's forward between a student's forward and backward, and two threads with different batches
  each give the gradients / outputs of their own batch (tiny random Mamba-2 and Qwen3.5 copies, CPU, fp32).
"""

import subprocess
import sys
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import packcollate
from packcollate import PackedCollator
from packcollate.compat import compare_packed_unpacked, proof_features, tiny_config
from packcollate.errors import NotPreparedError

HYBRIDS = ("mamba2", "qwen3_5_text")


def build(model_type: str, prepared: bool = True, seed: int = 0, **overrides):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="packcollate")
    return packcollate.prepare(model.eval()) if prepared else model.eval()


def test_import_patches_nothing_and_loads_no_tools():
    """In a fresh interpreter: transformers' PreTrainedModel methods, the attention-class tables of
    Falcon / GPT-Neo and the registries other than the two packcollate entries are the same objects
    and contents before and after `import packcollate`."""
    script = """
import sys
import transformers
from transformers import PreTrainedModel
from transformers.models.gpt_neo import modeling_gpt_neo
from transformers.models.falcon import modeling_falcon
methods = {name: PreTrainedModel.__dict__.get(name) for name in ("post_init", "__init__", "forward")}
tables = [dict(table) for table in (getattr(modeling_falcon, "FALCON_ATTENTION_CLASSES", {}),
                                    modeling_gpt_neo.GPT_NEO_ATTENTION_CLASSES)]
import packcollate
assert {name: PreTrainedModel.__dict__.get(name) for name in methods} == methods, "PreTrainedModel changed"
assert tables == [dict(table) for table in (getattr(modeling_falcon, "FALCON_ATTENTION_CLASSES", {}),
                                            modeling_gpt_neo.GPT_NEO_ATTENTION_CLASSES)], "a table changed"
loaded = sorted(m for m in sys.modules if m.startswith(("packcollate.tools", "packcollate.integrations")))
assert not loaded, loaded
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
assert "packcollate" in AttentionInterface._global_mapping and "packcollate" in AttentionMaskInterface._global_mapping
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_import_adds_nothing_to_models_and_prepare_only_layout_hooks_to_models_without_state():
    """A model built after `import packcollate` and never prepared has no packcollate hook or forward; a
    prepared Llama (nothing carries state, its attention goes through the backend) gets only the hooks that hand
    its calls' layout to the mask function, on its transformers models, and no layer's forward is replaced."""
    from transformers import PreTrainedModel

    unprepared = build("mamba2", prepared=False)
    assert not any(module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__
                   for module in unprepared.modules())
    llama = build("llama")
    hooked = [type(module).__name__ for module in llama.modules() if module._forward_pre_hooks or module._forward_hooks]
    assert hooked == ["LlamaForCausalLM", "LlamaModel"]
    assert all(isinstance(module, PreTrainedModel) for module in llama.modules()
               if module._forward_pre_hooks or module._forward_hooks)
    assert not any("forward" in module.__dict__ for module in llama.modules())


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "lfm2", "bloom"])
def test_an_unprepared_model_that_needs_it_refuses_its_first_forward(model_type):
    """Hybrid and internal-attention models call the backend's mask function: unprepared, it raises
    naming the fix, packed or not (with a cache too); prepared, the same batch is exact."""
    model = build(model_type, prepared=False)
    batch = PackedCollator()(proof_features())
    for use_cache in (False, True):
        with pytest.raises(NotPreparedError, match=r"call packcollate.prepare\(model\)"):
            model(**batch, use_cache=use_cache)
    packcollate.prepare(model)
    result = compare_packed_unpacked(model, proof_features())
    assert result.max_logit_diff <= 1e-4 and result.max_grad_rel_diff <= 1e-3, result


@pytest.mark.parametrize("model_type", ["mamba", "rwkv", "qwen3_5_text"])
def test_the_guard_refuses_an_unprepared_model_even_without_a_mask_call(model_type):
    """Pure state-space models call no mask function: nothing of packcollate runs in their forward, so the
    guard (PackingGuardCallback, plain loops) reads the model itself and refuses it unprepared."""
    model = build(model_type, prepared=False)
    with pytest.raises(NotPreparedError, match=r"call packcollate.prepare\(model\)"):
        packcollate.assert_packing_safe(model)
    packcollate.assert_packing_safe(packcollate.prepare(model))


def test_prepare_is_idempotent_and_a_deep_copy_restarts_its_own_layers():
    import copy

    model = build("mamba2")
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert packcollate.prepare(model) is model
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.5)
    batch = PackedCollator()(proof_features())
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, twin(**batch).logits)  # the twin runs its own weights
    assert compare_packed_unpacked(twin, proof_features()).max_logit_diff <= 1e-4


def gradients(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def loss_of(model, batch):
    return model(**batch).loss


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("model_type", HYBRIDS)
def test_two_packed_forwards_then_one_backward_under_gradient_checkpointing(model_type, use_reentrant):
    """Checkpointed layers recompute during backward, after later forwards ran: each recomputation
    uses the layout of its own forward (two batches with different example lengths)."""
    model = build(model_type)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    first = PackedCollator()(proof_features(lengths=(11, 27, 5, 19)))
    second = PackedCollator()(proof_features(seed=1, lengths=(30, 3, 29)))
    model.zero_grad()
    (loss_of(model, first) + loss_of(model, second)).backward()
    together = gradients(model)
    model.zero_grad()
    loss_of(model, first).backward()
    loss_of(model, second).backward()
    apart = gradients(model)
    for name, grad in apart.items():
        torch.testing.assert_close(together[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("use_reentrant", [True, None])
@pytest.mark.parametrize("model_type", HYBRIDS)
def test_a_teacher_forward_between_a_students_forward_and_backward(model_type, use_reentrant):
    """Another model's packed forward (a teacher, a reference) between the student's forward and backward
    leaves the student's layout alone, with gradient checkpointing on ([17] H1: 0.27 off with
    `use_reentrant=True`, a `CheckpointError` with the default, when the layout was a process global)."""
    student, teacher = build(model_type), build(model_type, seed=1)
    student.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs=None if use_reentrant is None else {"use_reentrant": use_reentrant})
    student.train()
    batch = PackedCollator()(proof_features())
    other = PackedCollator()(proof_features(seed=2, lengths=(40, 2, 20)))
    student.zero_grad()
    loss = loss_of(student, batch)
    with torch.no_grad():
        teacher(**other)
    loss.backward()
    interleaved = gradients(student)
    student.zero_grad()
    loss_of(student, batch).backward()
    for name, grad in gradients(student).items():
        torch.testing.assert_close(interleaved[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_threads_with_different_batches_see_their_own_layout(model_type):
    """Two threads run packed batches of different layouts through one model at once, 40 forwards in all:
    every output equals that batch's output alone ([17] H1: 40 of 40 were wrong with a process global)."""
    model = build(model_type)
    batches = [PackedCollator()(proof_features(seed=s, lengths=lengths))
               for s, lengths in ((0, (11, 27, 5, 19)), (1, (40, 2, 20)))]
    with torch.no_grad():
        expected = [model(**batch).logits for batch in batches]
    wrong, done = [], []

    def run(index):
        for _ in range(20):
            with torch.no_grad():
                if not torch.allclose(model(**batches[index]).logits, expected[index], atol=1e-6):
                    wrong.append(index)
                done.append(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong and len(done) == 40


def test_families_that_pick_their_attention_when_built_switch_through_prepare():
    """GPT-Neo picks an attention class by backend name when built and knows only its own: built with its
    default attention, `prepare(model, attn_implementation="packcollate")` puts it on the backend, exact."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neo")).eval()
    packcollate.prepare(model, attn_implementation="packcollate")
    assert model.config._attn_implementation == "packcollate"
    result = compare_packed_unpacked(model, proof_features(), reference_attn_implementation="eager")
    assert result.max_logit_diff <= 1e-4 and result.max_grad_rel_diff <= 1e-3, result


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_prepared_hybrid_generates_like_eager(cache_implementation):
    """`generate` builds a compileable cache's masks outside the model's forward: a prepared model is not
    refused there, and greedy generation equals transformers' eager attention."""
    model = build("qwen3_5_text")
    eager = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    ids = torch.tensor([[5, 17, 3, 99, 42, 8]])
    options = dict(max_new_tokens=4, do_sample=False, cache_implementation=cache_implementation)
    assert torch.equal(model.generate(ids, **options), eager.generate(ids, **options))


def test_a_forward_that_raises_leaves_the_callers_state_as_it_was():
    """A layout refused in a prepared model's pre-hook (a malformed `cu_seq_lens_q`) raises, and the forward
    state of the caller's thread is what it was before the call (no pop of someone else's state)."""
    from packcollate.backend import state
    from packcollate.errors import LayoutError

    model = build("mamba2")
    batch = PackedCollator()(proof_features())
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_q"][:-1]  # no longer ends at the row's tokens
    outer = state.PackedForward(True, None, None)
    state.push(outer)
    try:
        with pytest.raises(LayoutError, match="cu_seq_lens_q"):
            model(**batch)
        assert state.current() is outer
    finally:
        state.pop()
    assert state.current() is None


def test_internal_attention_switches_only_to_the_backend_and_back():
    """GPT-Neo's layers compute attention inside the model: `use_backend` switches it to packcollate and back
    to the backend it was built with, and refuses transformers' other backends (its layers would read their
    masks in their own convention), as transformers refuses them."""
    from packcollate.backend import use_backend
    from packcollate.errors import BackendRefused

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neo")).eval()
    with pytest.raises(BackendRefused, match="kept attn_implementation='eager' when asked for 'sdpa'"):
        use_backend(model, "sdpa")
    use_backend(model, "packcollate")
    with pytest.raises(BackendRefused, match="when asked for 'sdpa'"):
        use_backend(model, "sdpa")
    use_backend(model, "eager")
    assert model.config._attn_implementation == "eager"


def test_a_restarted_layer_called_with_a_layout_outside_its_model_refuses():
    """A restarted layer called directly with packed kwargs (not through its prepared model's forward)
    cannot know the layout of its call: it refuses instead of running the examples together."""
    from packcollate.backend import restart
    from packcollate.errors import UnsupportedError

    model = build("mamba2")
    mixer = restart.token_mixers(model)[0][1]
    hidden = torch.randn(1, 10, model.config.hidden_size)
    with pytest.raises(UnsupportedError, match="outside a forward of its prepared model"):
        mixer(hidden, seq_idx=torch.zeros(1, 10, dtype=torch.int32))
    mixer(hidden)  # a plain call: one sequence, as the layer itself runs it


def _padded_packed_row(features: list[list[int]], pad: int = 3) -> dict:
    """One row holding `features` one after another, then `pad` pads marked in `attention_mask`; `position_ids`
    restart at every example (a pad segment, TRL's padded packing): no `cu_seq_lens`."""
    ids = sum(features, [])
    positions = sum((list(range(len(f))) for f in features), [])
    return {"input_ids": torch.tensor([ids + [0] * pad]), "position_ids": torch.tensor([positions + list(range(pad))]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * pad])}


@pytest.mark.parametrize("model_type", ["gpt_bigcode", "llama"])
def test_a_padded_row_holding_several_examples_keeps_them_apart(model_type):
    """transformers looks for packed `position_ids` only without an `attention_mask`, and GPTBigCode's attention
    gets no `position_ids`: the prepared model's call tells the mask where its examples start (it mixed them by
    0.25 logits before), with and without a cache. A left-padded row whose positions run on is one sequence."""
    model = build(model_type)
    features = [list(range(3, 10)), list(range(20, 25)), list(range(40, 49))]
    batch = _padded_packed_row(features)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([f]), use_cache=False).logits[0] for f in features])
        for use_cache in (False, True):
            packed = model(**batch, use_cache=use_cache).logits[0, :alone.shape[0]]
            assert float((packed - alone).abs().max()) <= 1e-4, use_cache
        left = {"input_ids": torch.tensor([[0, 0] + features[0]]), "attention_mask": torch.tensor([[0, 0] + [1] * 7]),
                "position_ids": torch.tensor([[1, 1] + list(range(7))])}
        torch.testing.assert_close(model(**left, use_cache=False).logits[0, 2:], alone[:7], atol=1e-4, rtol=0)


def test_a_padded_row_holding_several_examples_is_refused_where_layers_run_them_apart():
    """Layers that carry state run their examples apart on unpadded packed rows only: one line, not a mix."""
    model = build("qwen3_5_text")
    batch = _padded_packed_row([list(range(3, 10)), list(range(20, 25))])
    with pytest.raises(ValueError, match="a padded batch whose rows hold several packed examples") as info:
        model(**batch, use_cache=False)
    assert "\n" not in str(info.value)


def test_a_prepared_token_classifier_takes_its_per_token_labels():
    """Only language models (they generate) must shift their labels: a token classifier reads them per token."""
    from transformers import AutoModelForTokenClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    model = packcollate.prepare(AutoModelForTokenClassification.from_config(config, attn_implementation="packcollate"))
    batch = PackedCollator()([{"input_ids": list(range(3, 10)), "labels": [0, 1, 2, 0, 1, 2, 0]},
                              {"input_ids": list(range(20, 25)), "labels": [2, 1, 0, 2, 1]}])
    assert torch.isfinite(model(**batch).loss)


def test_a_prepared_model_pickles():
    """`torch.save(model)` of a whole prepared model (hooks are module-level functions)."""
    import io

    model = build("llama")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    batch = PackedCollator()(proof_features())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_checkpointed_chunked_layers_recompute_with_their_forwards_layout():
    """Llama 4's chunked layers read the call's layout when nothing else carries it (position_ids only, a cache):
    recomputed under gradient checkpointing they read the same one, so the gradients match the unchecked step."""
    from transformers import DynamicCache

    batch = PackedCollator(return_flash_attn_kwargs=False)(
        [{"input_ids": list(range(3, 24))}, {"input_ids": list(range(30, 35))}, {"input_ids": list(range(40, 59))}])
    grads = []
    for checkpointing in (False, True):
        model = build("llama4_text")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**batch, cache=DynamicCache(config=model.config)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
