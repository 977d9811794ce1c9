"""Recurrent, convolutional and linear-attention layers restart at every packed example
(`packcollate.backend.restart`), and so does attention written inside the model.

Every model is a tiny random copy of a real transformers architecture (CPU, fp32): the packed
forward and backward through `attn_implementation="packcollate"` must equal the same examples one at
a time (logits 1e-4, relative gradients 1e-3), with and without the collator's `seq_idx`. Families
this transformers does not have are skipped (read at run time).
"""

import copy
import inspect
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

import packcollate
from packcollate import PackedCollator
from packcollate.backend import buckets
from packcollate.backend import restart as recurrent
from packcollate.compat import compare_packed_unpacked, proof_features, tiny_config
from packcollate.errors import NotPreparedError
from packcollate.layout import from_cu_seq_lens
from tests.helpers import build_prepared as build

pytestmark = pytest.mark.usefixtures("one_thread")


LOGITS, GRADS = 1e-4, 1e-3

# the hybrid, SSM and linear-attention families of issue 15 (text causal LMs)
FAMILIES = (
    "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "mamba", "mamba2", "falcon_mamba", "jamba", "bamba",
    "falcon_h1", "granitemoehybrid", "nemotron_h", "lfm2", "lfm2_moe", "zamba", "zamba2", "kimi_linear",
    "olmo_hybrid", "minimax", "recurrent_gemma", "xlstm", "rwkv",
)

# examples long and uneven enough for several length buckets of the exact path
LONG_LENGTHS = (200, 4, 61, 17, 150, 2)


def assert_exact(result):
    assert result.max_logit_diff <= LOGITS, result
    assert result.max_grad_rel_diff <= GRADS, result


@pytest.mark.parametrize("return_seq_idx", [False, True])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_equals_one_at_a_time(model_type, return_seq_idx):
    model = build(model_type)
    assert recurrent.token_mixers(model), "no token mixer found"
    collator = PackedCollator(return_seq_idx=return_seq_idx)
    assert_exact(compare_packed_unpacked(model, proof_features(), collator=collator))


# older families whose attention is written inside the model (no AttentionInterface)
INTERNAL_ATTENTION_FAMILIES = ("bloom", "mpt", "xglm", "openai-gpt", "gpt_neox_japanese", "gpt_neo")


@pytest.mark.parametrize("model_type", INTERNAL_ATTENTION_FAMILIES)
def test_internal_attention_runs_per_example(model_type):
    """Their attention layers (found from their source at run time) run their examples apart, with
    their own causal mask (and BLOOM's ALiBi) cut to each bucket."""
    model = build(model_type)
    assert recurrent.internal_attention_layers(model) and not recurrent.token_mixers(model)
    for collator in (PackedCollator(), PackedCollator(return_flash_attn_kwargs=False)):  # cu_seq_lens or positions
        assert_exact(compare_packed_unpacked(model, proof_features(lengths=LONG_LENGTHS), collator=collator))


@pytest.mark.parametrize("model_type", ["mamba2", "qwen3_5_text", "lfm2", "nemotron_h"])
def test_several_buckets_padding_segment_and_default_cache(model_type):
    """Lengths that make several buckets, a pad segment (pad_to_multiple_of), and `use_cache` left at
    the config's default (True: a plain training loop)."""
    model = build(model_type)
    features = proof_features(lengths=LONG_LENGTHS)
    layout = from_cu_seq_lens(PackedCollator()(features)["cu_seq_lens_q"], None, 1, sum(LONG_LENGTHS))
    assert len(buckets.bucket_plan(layout, "cpu", buckets.RECURRENT_COST).buckets) > 1  # really several buckets
    for collator in (PackedCollator(pad_to_multiple_of=16, return_seq_idx=True), PackedCollator()):
        assert_exact(compare_packed_unpacked(model, features, collator=collator, use_cache=model.config.use_cache))


@pytest.mark.parametrize("model_type", ["mamba2", "qwen3_5_text"])
def test_other_backends_still_mix_or_refuse(model_type):
    """The control: the same model through eager mixes packed examples (or transformers refuses the
    packed batch), so the exactness above is the restart's doing."""
    model = build(model_type, attn_implementation="eager")
    try:
        result = compare_packed_unpacked(model, proof_features())
    except ValueError as error:  # transformers: "can't keep packed sequences apart without ..."
        assert "packed" in str(error)
    else:
        assert result.max_logit_diff > 1e-3


@pytest.mark.parametrize("model_type", ["mamba2", "qwen3_5_text"])
def test_gradient_checkpointing_and_deepcopy(model_type):
    """Checkpointed layers recompute during backward, after the forward: the layout is still known.
    A deep copy keeps restarting, with its own layers."""
    model = build(model_type)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    assert_exact(compare_packed_unpacked(model, proof_features()))
    twin = copy.deepcopy(model.eval())
    for (_, original), (_, copied) in zip(recurrent.token_mixers(model), recurrent.token_mixers(twin)):
        assert copied.forward.__self__ is copied and original.forward.__self__ is original
    assert_exact(compare_packed_unpacked(twin, proof_features()))


@pytest.mark.parametrize("model_type", ["mamba2", "bloom"])
def test_padded_batches_run_as_eager_runs_them(model_type):
    """A padded batch (attention_mask with zeros) runs as transformers' eager runs it: its rows are its
    sequences (BLOOM's own attention gets eager's causal, padded mask)."""
    model = build(model_type)
    reference = build(model_type, attn_implementation="eager")
    batch = packcollate.PaddedCollator()(proof_features())
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        got, expected = model(**batch).logits[real], reference(**batch).logits[real]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_token_mixers_found_at_run_time():
    llama = build("llama")
    assert recurrent.token_mixers(llama) == [] and recurrent.internal_attention_layers(llama) == []
    names = [type(m).__name__ for _, m in recurrent.token_mixers(build("recurrent_gemma"))]
    assert names and "RecurrentGemmaRglru" not in names  # the RG-LRU runs inside its block's split


class CausalSum(torch.nn.Module):
    """A stand-in token mixer: running sum over the tokens, `(B, S, D)` -> `(B, S, D)`, and a per-token
    second output; its state carries across examples unless they run apart."""

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        assert "seq_idx" not in kwargs and "cu_seq_lens_q" not in kwargs and cache is None
        return hidden_states.cumsum(1), hidden_states * 2


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=9), st.integers(0, 5))
def test_run_per_example_is_each_example_alone(lengths, pad):
    """Property: buckets, right padding and the scatter back give each example's own output."""
    total = sum(lengths) + pad
    cu = torch.tensor([0, *torch.tensor(lengths + ([pad] if pad else [])).cumsum(0).tolist()], dtype=torch.int32)
    layout = from_cu_seq_lens(cu, None, 1, total)
    hidden = torch.randn(1, total, 3)
    mixer = CausalSum()
    summed, doubled = recurrent.run_per_example(mixer.forward, (hidden,), {"cache": object(), "seq_idx": 0}, layout,
                                                (1, total))
    plans = buckets.plan_buckets(torch.diff(cu).tolist(), buckets.RECURRENT_COST)
    real = [gather[torch.arange(gather.shape[1])[None, :].numpy() < lengths[:, None]] for gather, lengths in plans]
    assert sorted(int(i) for r in real for i in r) == list(range(total))  # every token once, in some bucket
    expected = torch.cat([piece.cumsum(1) for piece in hidden.split(torch.diff(cu).tolist(), dim=1)], dim=1)
    torch.testing.assert_close(summed, expected)
    torch.testing.assert_close(doubled, hidden * 2)


# --- fast kernels: their own seq_idx / cu_seq_lens path (stand-ins on CPU) --------------------


def stand_in_kernels(monkeypatch, modeling, calls: list):
    """Replace the kernel functions `modeling` wraps by "installed" stand-ins that record their
    kwargs and run the PyTorch fallback (a fake package, through transformers' own wrapper)."""
    package = types.ModuleType("packcollate_stand_in_kernels")
    monkeypatch.setitem(sys.modules, package.__name__, package)
    for function in recurrent.kernel_functions(modeling.Mamba2Mixer):
        fallback = inspect.getclosurevars(recurrent.kernel_wrapper(getattr(modeling, function.name))).nonlocals["torch_function"]

        def kernel(*args, seq_idx=None, cu_seqlens=None, _fallback=fallback, _name=function.name, **kwargs):
            calls.append((_name, seq_idx))
            return _fallback(*args, **kwargs)

        # the fallback's parameters and the two a packing-aware kernel takes
        signature = inspect.signature(fallback)
        parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("seq_idx", "cu_seqlens")]
        kernel.__signature__ = signature.replace(parameters=parameters)
        setattr(package, function.name, kernel)
        wrapped = use_kernel_func_from_hub_with_fallback(function.name, package.__name__)(fallback)
        monkeypatch.setattr(modeling, function.name, wrapped)


def test_kernel_path_gets_the_layout(monkeypatch):
    """With kernels "installed" on a kernel device, a Mamba-2 mixer runs packed and its kernels get the
    packed layout's seq_idx, also when the collator emitted none; Mamba-1's scan takes no seq_idx,
    so it keeps running its examples apart."""
    from transformers.models.mamba2 import modeling_mamba2

    model = build("mamba2")
    mixer = recurrent.token_mixers(model)[0][1]
    assert not recurrent.uses_kernels(mixer, torch.device("cuda"))  # nothing installed here
    calls: list = []
    stand_in_kernels(monkeypatch, modeling_mamba2, calls)
    recurrent.kernel_functions.cache_clear()
    monkeypatch.setattr(recurrent, "KERNEL_DEVICES", ("cpu", "cuda"))
    try:
        assert recurrent.uses_kernels(mixer, torch.device("cuda"))
        assert not recurrent.uses_kernels(mixer, torch.device("meta"))
        batch = PackedCollator(return_seq_idx=True)(proof_features())
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "seq_idx"})
        assert calls and all(torch.equal(seq_idx, batch["seq_idx"]) for _, seq_idx in calls)
        assert not recurrent.uses_kernels(recurrent.token_mixers(build("mamba"))[0][1], torch.device("cuda"))
    finally:
        recurrent.kernel_functions.cache_clear()


# --- Qwen4-Exp: sparse indexer, n-gram embeddings, dilated convolution, gated delta nets --------

# PLE (hashed n-gram embeddings + a dilated depthwise convolution) on the two gated delta-net layers
# (its default config has none); eos 2 resets the n-gram context inside an example
QWEN4_EXP_PLE = {"ple_layer_ids": [1, 2], "eos_token_id": 2, "ple_embed_dim": 64, "number_of_conv_states": 3}


def qwen4_exp(**overrides):
    model = build("qwen4_exp_text", **{**QWEN4_EXP_PLE, **overrides})
    with torch.no_grad():  # its convolution starts at zero: give it weight, so that it mixes tokens
        for name, layer in model.named_modules():
            if name.endswith(".ple"):
                layer.conv1d.weight.normal_(0.0, 0.5)
    return model


def qwen4_exp_features():
    """Uneven examples: one ends with eos, one holds it in the middle, the others none (the n-gram
    context must restart at every example whether or not the one before ended with eos)."""
    features = proof_features(lengths=(11, 27, 5, 19, 40))
    features[0]["input_ids"][-1] = 2
    features[1]["input_ids"][9] = 2
    return features


@pytest.mark.parametrize("use_cache", [False, True])
def test_qwen4_exp_packs_exactly(use_cache):
    """Packed equals one example at a time through transformers' eager attention: the indexer picks its
    top-k blocks inside each example, the n-gram embeddings and the dilated convolution restart at every
    example, and so do the gated delta nets."""
    model = qwen4_exp()
    apart = [type(m).__name__ for _, m in recurrent.mask_reading_layers(model)]
    mixers = {type(m).__name__ for _, m in recurrent.token_mixers(model)}
    assert apart == ["Qwen4ExpTextAttention"] * 2 and {"Qwen4ExpTextPLELayer", "Qwen4ExpTextGatedDeltaNet"} <= mixers
    assert model.config.indexer_budget < 27  # the indexer really selects (not every key fits its budget)
    result = compare_packed_unpacked(model, qwen4_exp_features(), reference_attn_implementation="eager",
                                     use_cache=use_cache)
    assert_exact(result)


def test_qwen4_exp_ngram_context_crosses_examples_unless_restarted():
    """The control: with its PLE layers run over the packed row as transformers runs them, an example's
    first n-grams hash the previous example's last tokens (no eos between them), and the convolution
    reaches back into it."""
    model = qwen4_exp()
    for name, layer in model.named_modules():
        if name.endswith(".ple"):
            del layer.__dict__["forward"]  # the class's own forward again
    result = compare_packed_unpacked(model, qwen4_exp_features())
    assert result.max_logit_diff > 1e-3


# --- decoders whose positions are arange over the call (encoder-decoder families) ----------------

# their causal LM takes no position_ids: positions restart per example once prepared
ROW_POSITION_DECODERS = ("bart", "marian", "pegasus", "mbart", "whisper", "plbart", "blenderbot", "blenderbot-small",
                         "mvp", "trocr")


def packed_vs_alone_without_labels(model, features, use_cache):
    """Logits and gradients of the shifted token loss computed from the logits (these models do not shift their
    labels: no labels are passed), packed against each example alone on the same model."""
    from packcollate.compat.equivalence import (
        gradients,
        max_relative_grad_diff,
        summed_token_loss,
    )

    batch = PackedCollator()(features)
    labels = batch.pop("labels")
    count = int((labels != -100).sum())
    model.zero_grad()
    out = model(**batch, use_cache=use_cache)
    (summed_token_loss(out.logits, labels) / count).backward()
    packed_grads, packed_logits = gradients(model), out.logits[0].detach()
    model.zero_grad()
    pieces = []
    for example in features:
        ids = torch.tensor([example["input_ids"]])
        alone = model(input_ids=ids, use_cache=use_cache)
        (summed_token_loss(alone.logits, torch.cat([torch.tensor([[-100]]), ids[:, 1:]], 1)) / count).backward()
        pieces.append(alone.logits[0].detach())
    grad_diff, _ = max_relative_grad_diff(packed_grads, gradients(model))
    return float((packed_logits - torch.cat(pieces)).abs().max()), grad_diff


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("model_type", ROW_POSITION_DECODERS)
def test_decoder_positions_restart_at_every_example(model_type, use_cache):
    model = build(model_type)
    assert recurrent.row_position_embeddings(model), "no positional embedding found"
    logits, grads = packed_vs_alone_without_labels(model, proof_features(), use_cache)
    assert logits <= LOGITS and grads <= GRADS, (logits, grads)


@pytest.mark.parametrize("model_type", ["bart", "whisper"])
def test_decoders_refuse_what_they_cannot_train_exactly(model_type):
    """Labels these models read unshifted (the target of logits[t] is labels[t]) would teach them to copy their
    input; an unprepared model numbers the packed row: both refuse at the first packed forward, in one line."""
    batch = PackedCollator()(proof_features())
    model = build(model_type)
    with pytest.raises(ValueError, match="computes its loss without shifting the labels") as info:
        model(**batch)
    assert "\n" not in str(info.value)
    from tests.helpers import tiny_backend_model

    unprepared = tiny_backend_model(model_type)
    batch.pop("labels")
    with pytest.raises(RuntimeError, match="PositionalEmbedding number the packed row's tokens"):
        unprepared(**batch)


@pytest.mark.parametrize("model_type", ["big_bird", "rembert"])
def test_bidirectional_internal_attention_refuses_or_packs_as_a_decoder(model_type):
    """Encoder models whose attention is written inside them run their packed examples per bucket with causal
    masks: with their default `is_decoder=False` (bidirectional) that would silently turn causal, so the first
    packed forward refuses in one line; built as decoders they pack exactly."""
    batch = PackedCollator()(proof_features())
    with pytest.raises(ValueError, match=r"is not causal here \(config.is_decoder=False\)") as info:
        build(model_type)(**batch)
    assert "\n" not in str(info.value)
    assert_exact(compare_packed_unpacked(build(model_type, is_decoder=True), proof_features()))


@pytest.mark.parametrize("model_type", ["llama4_text"])
def test_row_position_layers_keep_their_chunks(model_type):
    """Llama 4 numbers its tokens inside its attention (its temperature on NoPE layers): those layers run per
    example once prepared, while its chunked layers keep their chunks on the packed row (run per example they
    lost them: 0.52 off)."""
    model = build(model_type)
    restarted = recurrent.row_position_attention_layers(model)
    assert restarted and len(restarted) < len(model.model.layers)
    assert_exact(compare_packed_unpacked(model, proof_features(), reference_attn_implementation="eager"))


def test_row_counting_attention_refuses_unprepared():
    """Unprepared, Llama 4's NoPE layers scale their queries by the packed row's positions (with a small
    floor_scale: 0.13 relative gradient off, silently): its modeling file is read, so the first packed forward
    refuses in one line; prepared, it is exact."""
    from tests.helpers import tiny_backend_model

    needs = recurrent.stateful_classes(type(tiny_config("llama4_text")))
    assert needs.row_counting == ("Llama4TextAttention",)
    model = tiny_backend_model("llama4_text", attn_temperature_tuning=True, floor_scale=4)
    with pytest.raises(NotPreparedError, match=r"Llama4TextAttention number the packed row's tokens") as info:
        model(**PackedCollator()(proof_features()))
    assert "\n" not in str(info.value)
    assert_exact(compare_packed_unpacked(packcollate.prepare(model), proof_features(),
                                         reference_attn_implementation="eager"))
