"""The `packcollate` attention backend (`packcollate.backend.attention`): exact on every architecture, with or without
a cache, and a malformed layout refused in one clear ValueError instead of mixing examples.

Every architecture is a tiny random copy built from its default config (CPU, fp32, no download).
The packed batch runs through `packcollate`; the references run through transformers' own `eager`
attention: one example at a time (logits) and a padded batch (gradients). Called directly, the backend
refuses malformed `cu_seq_lens` and `position_ids` (or failing deep in a kernel), honours a 2-D padding mask
given directly, and its layout cache does not go stale after edits that bypass the version counter. The
kernels and the mask function: test_kernels.py, test_mask.py; the layout cache's bounds: tests/test_layout.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import packcollate
from packcollate import PackedCollator
from packcollate.backend import attention, restart
from packcollate.backend import mask as backend_mask
from packcollate.compat import compare_packed_unpacked
from packcollate.errors import UnsupportedError
from tests.helpers import build_prepared, call, cuda, qkv
from tests.helpers import tiny_backend_model as tiny_model

torch.set_num_threads(1)


ARCHITECTURES = [
    "llama",
    "mistral",  # sliding window (8 tokens) smaller than most examples
    "qwen2",
    "qwen3",
    "gemma2",  # logit softcapping + sliding window
    "phi3",
    "olmo2",
    "granite",
    "starcoder2",
    "gpt_neox",
    "gpt_oss",  # attention sinks (s_aux) + sliding window + MoE
    "gemma3_text",
    "mixtral",
    "stablelm",
]
LENGTHS = [5, 17, 9, 30, 2, 24]


def features(seed: int = 0, lengths=LENGTHS) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, 256, n).tolist()} for n in lengths]


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_packed_equals_one_at_a_time_and_padded(model_type, use_cache):
    model = tiny_model(model_type)
    unpacked = compare_packed_unpacked(
        model, features(), reference="unpacked", reference_attn_implementation="eager", use_cache=use_cache
    )
    assert unpacked.max_logit_diff < 1e-5
    assert unpacked.loss_diff < 1e-5
    padded = compare_packed_unpacked(
        model, features(), reference="padded", reference_attn_implementation="eager", use_cache=use_cache
    )
    assert padded.max_grad_rel_diff < 1e-5, padded.worst_parameter
    assert padded.loss_diff < 1e-5


def test_sliding_window_is_exercised():
    """Mistral's tiny window (8) is shorter than the examples: a full-attention run must differ."""
    windowed = tiny_model("mistral")
    full = tiny_model("mistral", sliding_window=None)
    batch = PackedCollator()(features())
    assert not torch.allclose(windowed(**batch).logits, full(**batch).logits, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
@pytest.mark.parametrize("source", ["cu_seq_lens", "position_ids", "mask"])
def test_every_layout_source_is_exact(model_type, source, monkeypatch):
    """The layout is read from cu_seq_lens, else position_ids, else this backend's mask."""
    model = tiny_model(model_type)
    collator = PackedCollator(return_flash_attn_kwargs=source == "cu_seq_lens")
    if source == "mask":
        # a model whose layers pass neither kwargs nor position_ids on to attention
        inner = attention.packcollate_attention

        def dropping(module, q, k, v, mask, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
            return inner(module, q, k, v, mask, **kwargs)

        from transformers import AttentionInterface

        monkeypatch.setitem(AttentionInterface._global_mapping, "packcollate", dropping)
    result = compare_packed_unpacked(
        model, features(), collator=collator, reference="unpacked", reference_attn_implementation="eager"
    )
    assert result.max_logit_diff < 1e-5
    assert result.max_grad_rel_diff < 1e-5


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_with_attention_mask_are_exact(model_type, side):
    """A normal padded batch (2-D attention_mask, right or left padding) through packcollate equals eager."""
    ours = tiny_model(model_type)
    eager = tiny_model(model_type, attn_implementation="eager")
    rng = np.random.default_rng(1)
    lengths = [7, 19, 3, 12]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.from_numpy(rng.integers(3, 256, n))
        mask[row, cols] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    real = mask.bool()
    assert torch.allclose(ours(**kwargs).logits[real], eager(**kwargs).logits[real], atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_generation_matches_eager(model_type):
    """Decoding with a cache (queries shorter than keys) and left padding matches transformers' eager."""
    ours = tiny_model(model_type)
    eager = tiny_model(model_type, attn_implementation="eager")
    ids = torch.tensor([[0, 0, 5, 9, 11, 4], [7, 3, 8, 6, 2, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(**kwargs), eager.generate(**kwargs))


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_generation_with_a_static_cache_matches_eager(model_type):
    """A static cache hands every call all `max_cache_len` keys, unfilled slots included: prefill stays
    causal and decoding never attends an empty slot."""
    ours = tiny_model(model_type)
    eager = tiny_model(model_type, attn_implementation="eager")
    ids = torch.tensor([[0, 0, 0, 5, 9, 11, 4, 8, 3], [7, 3, 8, 6, 2, 10, 12, 5, 9]])
    mask = (ids != 0).long()
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
              "cache_implementation": "static", "output_logits": True, "return_dict_in_generate": True}
    got, want = ours.generate(**kwargs), eager.generate(**kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, want.logits)) < 1e-5


@pytest.mark.parametrize("window", [None, 3])
def test_a_call_with_cached_keys_and_no_mask(window):
    """Called directly with more keys than queries and no mask (a model that builds no mask): the
    queries are the last of the keys, causal and windowed as eager's definition."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 2, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    module = torch.nn.Module()
    got, _ = attention.packcollate_attention(module.eval(), q, k, v, None, sliding_window=window)
    i = torch.arange(4, 6)[:, None]  # query positions among the 6 keys
    j = torch.arange(6)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed
    )
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-6)


def test_inference_mode_forward():
    """Tensors made under torch.inference_mode have no version counter: layouts are not cached, and
    packed and padded batches still work."""
    model = tiny_model("llama")
    batch = PackedCollator()(features())
    with torch.no_grad():
        want = model(**batch).logits
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, want)
        padded = model(input_ids=torch.tensor([[5, 9, 11, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]])).logits
    assert torch.isfinite(padded).all()


@pytest.mark.parametrize("use_cache", [False, True])
def test_padded_rows_of_packed_examples_are_exact(use_cache):
    """Batch of 2 rows, each packing two examples (position_ids restart), the second right-padded
    (2-D attention_mask): each example sees only itself."""
    ours = tiny_model("llama")
    eager = tiny_model("llama", attn_implementation="eager")
    rows = [features(3, [5, 7]), features(4, [4, 6])]
    width = 12
    ids = torch.zeros(2, width, dtype=torch.long)
    positions, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example["input_ids"])
            ids[r, start : start + n] = torch.tensor(example["input_ids"])
            positions[r, start : start + n] = torch.arange(n)
            mask[r, start : start + n] = 1
            start += n
    with torch.no_grad():
        got = ours(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=use_cache).logits
        for r, row in enumerate(rows):
            want = torch.cat([eager(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in row])
            assert torch.allclose(got[r, : len(want)], want, atol=1e-5)


def test_mqa_and_gqa_are_exact():
    for kv_heads in (1, 2):
        model = tiny_model("llama", num_key_value_heads=kv_heads)
        result = compare_packed_unpacked(model, features(), reference_attn_implementation="eager")
        assert result.max_logit_diff < 1e-5


def test_dropout_applies_in_training_only():
    model = tiny_model("llama", attention_dropout=0.5)
    batch = PackedCollator()(features())
    with torch.no_grad():
        eval_a, eval_b = model(**batch).logits, model(**batch).logits
        model.train()
        train_a, train_b = model(**batch).logits, model(**batch).logits
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train_a, train_b)


def test_registered_with_transformers():
    model = tiny_model("llama", attn_implementation="sdpa")
    model.set_attn_implementation("packcollate")
    assert model.config._attn_implementation == "packcollate"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["packcollate"] is attention.packcollate_attention
    assert AttentionMaskInterface._global_mapping["packcollate"] is backend_mask.packcollate_mask


def test_mismatched_cu_seq_lens_is_a_clear_error():
    model = tiny_model("llama")
    batch = PackedCollator()(features())
    batch["input_ids"] = batch["input_ids"][:, :-3]  # cut after collation
    batch["labels"] = batch["labels"][:, :-3]
    batch["position_ids"] = batch["position_ids"][:, :-3]
    with pytest.raises(ValueError, match=r"cu_seq_lens_q: expected it to end at the batch's 84 tokens.*got 87"):
        model(**batch)


def test_describe_reports_call_sites():
    model = tiny_model("llama")
    model(**PackedCollator()(features()))
    text = attention.describe()
    assert "LlamaAttention [cpu, float32]: exact-sdpa" in text
    assert "flash-attn:" in text and "varlen_attn:" in text


# ---------------------------------------------------------------------------------------------
# Called directly: the layout it is given (cu_seq_lens, position_ids, 2-D masks) and its cache
# ---------------------------------------------------------------------------------------------


def reference(q, k, v, segments: list[tuple[int, int, int]]) -> dict:
    """`{(row, start, end): (end-start, H, D)}` causal attention of each segment on its own."""
    out = {}
    for row, start, end in segments:
        o = F.scaled_dot_product_attention(q[row : row + 1, :, start:end], k[row : row + 1, :, start:end],
                                           v[row : row + 1, :, start:end], is_causal=True)
        out[(row, start, end)] = o[0].transpose(0, 1)
    return out


def assert_segments(out, expected):
    for (row, start, end), value in expected.items():
        torch.testing.assert_close(out[row, start:end], value, atol=1e-5, rtol=1e-5)


def _valid(bounds: list[int], total: int) -> bool:
    return len(bounds) >= 2 and bounds[0] == 0 and bounds[-1] == total and all(a < b for a, b in zip(bounds, bounds[1:]))


@settings(max_examples=60, deadline=None)
@given(bounds=st.lists(st.integers(-2, 14), min_size=1, max_size=6), shuffle=st.booleans())
def test_cu_seq_lens_are_validated_or_exact(bounds, shuffle):
    """Any (k+1,) int tensor: refused with a ValueError naming cu_seq_lens_q, or attention is exact per segment."""
    total = 12
    if shuffle:
        bounds = sorted(bounds)
    q, k, v = qkv(1, total)
    cu = torch.tensor(bounds, dtype=torch.int32)
    if not _valid(bounds, total):
        with pytest.raises(ValueError, match="cu_seq_lens_q"):
            call(q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=None)
        return
    out = call(q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert_segments(out, reference(q, k, v, [(0, a, b) for a, b in zip(bounds, bounds[1:])]))


@pytest.mark.parametrize("bounds, message", [
    ([0, 6, 4, 10], r"strictly increasing .* got 6 then 4"),
    ([0, 12, 10], r"strictly increasing .* got 12 then 10"),
    ([2, 4, 10], r"cumulative lengths starting at 0, got \[2, 4, 10\]$"),
    ([0, 4, 4, 10], r"strictly increasing"),
    ([0, 4, 9], r"it to end at the batch's 10 tokens"),
])
def test_malformed_cu_seq_lens_name_the_problem(bounds, message):
    q, k, v = qkv(1, 10)
    cu = torch.tensor(bounds, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q: expected " + message):
        call(q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


@pytest.mark.parametrize("value", [[0, 4, 10], (0, 4, 10)])
def test_a_python_list_of_cu_seq_lens_is_a_clear_error(value):
    q, k, v = qkv(1, 10)
    with pytest.raises(ValueError, match=r"cu_seq_lens_q: expected a \(k\+1,\) int32 torch tensor .* got (list|tuple)"):
        call(q, k, v, cu_seq_lens_q=value, cu_seq_lens_k=value)


def test_float_cu_seq_lens_and_a_short_max_length_are_refused():
    q, k, v = qkv(1, 10)
    with pytest.raises(ValueError, match="cu_seq_lens_q: expected an integer tensor, got dtype torch.float32"):
        call(q, k, v, cu_seq_lens_q=torch.tensor([0.0, 4.0, 10.0]))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"max_length_q: expected at least the longest sequence .* \(6\), got 4"):
        call(q, k, v, cu_seq_lens_q=cu, max_length_q=4)


@pytest.mark.parametrize("shape", [(1, 9), (1, 11), (3, 10)])
def test_position_ids_of_another_shape_are_refused(shape):
    """Today they are ignored, and the two examples of the row attend to each other."""
    q, k, v = qkv(2, 10)
    position_ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position_ids: expected shape \(2, 10\) or \(1, 10\) like the query's tokens"):
        call(q, k, v, position_ids=position_ids)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_a_2d_padding_mask_given_directly_is_honoured(dtype):
    """Row 0 right-padded (6 real), row 1 left-padded (7 real): each row's real tokens attend only among themselves."""
    q, k, v = qkv(2, 9, seed=1)
    mask = torch.zeros(2, 9, dtype=torch.int64)
    mask[0, :6] = 1
    mask[1, 2:] = 1
    out = call(q, k, v, mask.to(dtype))
    assert_segments(out, reference(q, k, v, [(0, 0, 6), (1, 2, 9)]))
    assert torch.isfinite(out).all()


def test_a_float_or_misshapen_2d_mask_is_refused():
    q, k, v = qkv(2, 9)
    with pytest.raises(ValueError, match="attention_mask: expected a .* bool or integer padding mask"):
        call(q, k, v, torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"attention_mask: expected a padding mask of shape \(2, 9\)"):
        call(q, k, v, torch.ones(2, 8, dtype=torch.long))


def _edit_numpy(tensor, index, value):
    tensor.numpy()[index] = value  # shares memory, does not bump tensor._version


def _edit_data(tensor, index, value):
    tensor.data[index] = value  # a view with its own version counter


@pytest.mark.parametrize("edit", [_edit_numpy, _edit_data])
def test_layout_cache_sees_edits_that_bypass_the_version_counter_positions(edit):
    q, k, v = qkv(1, 10, seed=2)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    call(q, k, v, position_ids=position_ids)  # one sequence, cached
    version = position_ids._version
    edit(position_ids, (0, slice(4, None)), torch.arange(6).numpy() if edit is _edit_numpy else torch.arange(6))
    assert position_ids._version == version  # the edit is invisible to the version counter
    out = call(q, k, v, position_ids=position_ids)
    assert_segments(out, reference(q, k, v, [(0, 0, 4), (0, 4, 10)]))


@pytest.mark.parametrize("edit", [_edit_numpy, _edit_data])
def test_layout_cache_sees_edits_that_bypass_the_version_counter_cu(edit):
    q, k, v = qkv(1, 10, seed=3)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    call(q, k, v, cu_seq_lens_q=cu)
    edit(cu, 1, 3)
    out = call(q, k, v, cu_seq_lens_q=cu)
    assert_segments(out, reference(q, k, v, [(0, 0, 3), (0, 3, 10)]))


# ---------------------------------------------------------------------------------------------
# GPU: a model on the backend (run whenever CUDA is available)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
def test_cuda_model_packed_equals_unpacked():
    model = tiny_model("llama").cuda().to(torch.bfloat16)
    result = compare_packed_unpacked(model, features(), reference="unpacked", reference_attn_implementation="eager")
    assert result.max_logit_diff < 5e-2


# ---------------------------------------------------------------------------------------------
# Architectures that needed more than the attention function
# ---------------------------------------------------------------------------------------------


def test_falcon_is_exact_on_the_backend_in_every_release():
    """Falcon's mask ignores position_ids: sdpa mixes packed examples. Up to transformers 5.24 its
    attention is written inside the model (a class per backend name, picked when it is built): built
    with its default attention and prepared for the backend, its attention layers run their examples
    apart; from 5.25 it calls AttentionInterface and reaches the backend directly. Which one this
    release does is read here."""
    from transformers.models.falcon import modeling_falcon

    ours = packcollate.prepare(tiny_model("falcon", attn_implementation="eager"), attn_implementation="packcollate")
    internal = [type(layer).__name__ for _, layer in restart.internal_attention_layers(ours)]
    if hasattr(modeling_falcon, "FALCON_ATTENTION_CLASSES"):
        assert internal and set(internal) == {"FalconAttention"}
    else:
        assert not internal and hasattr(modeling_falcon, "ALL_ATTENTION_FUNCTIONS")
    eager = tiny_model("falcon", attn_implementation="eager")
    eager.load_state_dict(ours.state_dict())
    batch = PackedCollator()(features())
    packed = ours(**batch).logits[0]
    start = 0
    for example in features():
        n = len(example["input_ids"])
        alone = eager(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        assert torch.allclose(packed[start : start + n], alone, atol=1e-5)
        start += n
    sdpa = tiny_model("falcon", attn_implementation="sdpa")
    sdpa.load_state_dict(ours.state_dict())
    assert not torch.allclose(sdpa(**batch).logits[0], packed, atol=1e-3)  # the failure the backend avoids


@pytest.mark.parametrize("use_cache", [False, True])
def test_llama4_chunked_layers_keep_their_chunks(use_cache):
    """Chunked-attention layers: chunks start at every example's start (cu_seq_lens), whether or not
    transformers' mask saw the packing (with a cache, or transformers 5.17, its chunks run across the row)."""
    model = build_prepared("llama4_text")  # its NoPE layers number their tokens themselves: prepared
    assert "chunked_attention" in model.config.layer_types
    result = compare_packed_unpacked(model, features(), reference_attn_implementation="eager", use_cache=use_cache)
    assert result.max_logit_diff < 1e-5 and result.max_grad_rel_diff < 1e-5


@pytest.mark.parametrize("term", attention.LOGIT_TERMS)
def test_logit_terms_the_backend_does_not_apply_are_refused(term):
    """A term on the attention logits the backend does not apply (ALiBi, a generic attention bias,
    block-sparse indices) would be silently dropped: the backend refuses it, naming the module. (A sparse
    indexer's key indices without their 4-D mask: tests/backend/test_mask_readers.py.)"""
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 16)
    bias = torch.zeros(1, 4, 6, 6)
    with pytest.raises(ValueError, match=f"LlamaAttention passes '{term}', a term on the attention logits"):
        attention.packcollate_attention(module, q, q, q, None, **{term: bias})
    out, _ = attention.packcollate_attention(module, q, q, q, None, **{term: None})  # None: nothing to apply
    assert out.shape == (1, 6, 4, 16)


# Inkling's relative position bias (and its log-scaled queries, counted from each example's start once
# its attention runs per example), Inkling 2's per-token sinks: applied by the backend, not refused
LOGIT_TERM_FAMILIES = [("inkling_text", {}), ("inkling_text", {"log_scaling_n_floor": 4}), ("inkling2_text", {})]


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("model_type,overrides", LOGIT_TERM_FAMILIES)
def test_position_bias_and_token_sinks_are_applied(model_type, overrides, use_cache):
    from tests.helpers import build_prepared

    model = build_prepared(model_type, **overrides)
    result = compare_packed_unpacked(model, features(lengths=[5, 17, 9, 30]), reference_attn_implementation="eager",
                                     use_cache=use_cache)
    assert result.max_logit_diff < 1e-4 and result.max_grad_rel_diff < 1e-3, result


def test_position_bias_reaches_the_exact_path():
    """Called directly on a packed row: the bias of each example's own query/key pairs and the per-token sinks
    change the output exactly as the eager formula over that example alone says."""
    q, k, v = qkv(1, 11)
    heads = q.shape[1]
    bias, sinks = torch.randn(1, heads, 11, 11), torch.randn(1, heads, 11, 1)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    got = call(q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7, position_bias=bias,
               sinks=sinks, scaling=0.25)
    for start, end in ((0, 4), (4, 11)):
        logits = q[:, :, start:end] @ k[:, :, start:end].transpose(-1, -2) * 0.25 + bias[..., start:end, start:end]
        logits = logits.masked_fill(~torch.ones(end - start, end - start, dtype=torch.bool).tril(), float("-inf"))
        probs = torch.cat([logits, sinks[:, :, start:end]], dim=-1).softmax(-1)[..., :-1]
        torch.testing.assert_close(got[:, start:end], (probs @ v[:, :, start:end]).transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("term,shape", [("position_bias", (1, 4, 6, 5)), ("position_bias", (6, 6)),
                                        ("sinks", (1, 4, 6)), ("sinks", (4,))])
def test_misshapen_logit_terms_are_refused_in_one_line(term, shape):
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 16)
    with pytest.raises(ValueError, match=f"LlamaAttention passes {term} of shape") as info:
        attention.packcollate_attention(module, q, q, q, None, **{term: torch.zeros(shape)})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("flash_kwargs", [True, False])
def test_byte_patching_models_refuse_packed_batches_until_prepared(flash_kwargs):
    """BLT pools bytes into patches over the packed row (a patch can hold bytes of two examples) and runs its
    global transformer over the row's patches. Unprepared, it refuses at its first packed forward in one line,
    whether the layout comes as cu_seq_lens or as position_ids only; its attention layers refuse a packed call too
    (the last line, should a forward reach them without the mask function). Prepared, padded batches run and packed
    ones are exact (tests/backend/test_patches.py)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from packcollate.errors import NotPreparedError

    if "blt" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no BLT")
    model = tiny_model("blt")
    batch = PackedCollator(return_flash_attn_kwargs=flash_kwargs)(features())
    with pytest.raises(NotPreparedError, match="pools its tokens into patches") as info:
        model(**batch, use_cache=False)
    assert "\n" not in str(info.value)
    layer = model.model.local_encoder.layers[0].self_attn
    q = torch.randn(1, layer.num_heads, 8, layer.head_dim)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(UnsupportedError, match="BltSelfAttention belongs to a model that pools its tokens into patches "
                                               "and was not prepared") as info:
        attention.packcollate_attention(layer, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5,
                                        max_length_k=5)
    assert "\n" not in str(info.value)
    padded = packcollate.PaddedCollator()(features())
    with torch.no_grad():
        assert packcollate.prepare(model)(**padded, use_cache=False).logits.shape[:2] == padded["input_ids"].shape


# BigBird-Pegasus builds its decoder self-attention with is_causal=False and relies on transformers' 4-D causal
# mask: the backend (handed the sequence map) would let each token attend to the later tokens of its example
def test_decoder_attention_that_says_not_causal_is_refused():
    """Refused in one line at the first forward, packed or one example at a time (both were wrong: the logits of a
    token changed when a later token did); with transformers' own 4-D mask (a cache) it is honoured."""
    model = build_prepared("bigbird_pegasus")  # prepared: its positions restart per example
    ids = torch.arange(3, 15)[None]
    with pytest.raises(UnsupportedError,
                       match=r"^attn_implementation='packcollate': BigBirdPegasusDecoderAttention is a decoder's "
                             r"attention over its own tokens that says is_causal=False") as error:
        model(input_ids=ids, use_cache=False)
    assert "\n" not in str(error.value)


def test_a_decoder_attention_not_causal_over_a_4d_mask_is_honoured():
    """The refusal leaves a call with a 4-D mask alone (transformers' own, with a cache): the mask decides."""
    layer = torch.nn.Module()
    layer.is_causal, layer.is_decoder, layer.training = False, True, False
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    out = attention.packcollate_attention(layer, q, k, v, causal)[0]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=causal).transpose(1, 2)
    torch.testing.assert_close(out, reference)
    with pytest.raises(UnsupportedError, match="says is_causal=False"):
        attention.packcollate_attention(layer, q, k, v, None)
