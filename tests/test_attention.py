"""The `packcollate` attention backend: exact on every architecture, with or without a cache.

Every architecture is a tiny random copy built from its default config (CPU, fp32, no download).
The packed batch runs through `packcollate`; the references run through transformers' own `eager`
attention: one example at a time (logits) and a padded batch (gradients).
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import packcollate  # noqa: F401  (registers the backend)
from packcollate import PackedCollator
from packcollate.backend import attention, buckets, kernels, restart
from packcollate.backend import mask as backend_mask
from packcollate.backend.kernels import AttentionOptions, exact_varlen
from packcollate.layout import SequenceLayout
from packcollate.compat import compare_packed_unpacked, tiny_config

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


def tiny_model(model_type: str, attn_implementation: str = "packcollate", **overrides):
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


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


def test_mask_is_a_sequence_map_not_a_square_matrix():
    """The registered mask function returns `(B, S)` ids (never `S x S`) and finds packing from position_ids."""
    from transformers.masking_utils import create_causal_mask

    model = tiny_model("llama")
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    embeds = torch.zeros(1, 9, model.config.hidden_size)
    mask = create_causal_mask(model.config, embeds, None, None, position_ids=position_ids)
    assert mask.shape == (1, 9) and mask.dtype == torch.int32
    assert mask.tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3]]
    padded = create_causal_mask(model.config, embeds, torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0]]), None)
    assert padded.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0, 0]]
    assert create_causal_mask(model.config, embeds, None, None) is None


def test_layers_flagged_bidirectional_under_a_causal_mask_get_transformers_mask(monkeypatch):
    """A config with `use_bidirectional_attention` (its layers say `is_causal=False`, PaliGemma) whose mask
    is causal somewhere gets transformers' own `(B, 1, S, S)` mask, packing and blocks included; a mask
    that is bidirectional everywhere (an encoder) stays linear, except while tracing (no data-dependent check)."""
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    model = tiny_model("llama")
    config = model.config.__class__(**model.config.to_dict())
    config.use_bidirectional_attention = True
    config._attn_implementation = "packcollate"
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    embeds = torch.zeros(1, 9, config.hidden_size)
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    tril = torch.arange(9)[:, None] >= torch.arange(9)[None, :]
    same = seq[:, None] == seq[None, :]
    mask = create_causal_mask(config, embeds, None, None, position_ids=position_ids)
    assert mask.shape == (1, 1, 9, 9) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], tril & same)
    prefix = torch.tensor([[0, 0, -1, 0, -1, 0, 0, 0, -1]])  # PaliGemma's prefix block ids, one per sequence
    blocked = create_causal_mask(config, embeds, None, None, position_ids=position_ids, block_sequence_ids=prefix)
    in_prefix = (prefix[0] == 0)[:, None] & (prefix[0] == 0)[None, :]
    assert torch.equal(blocked[0, 0], (tril | in_prefix) & same)
    assert create_bidirectional_mask(config, embeds, None) is None  # an encoder: linear, as before
    assert create_causal_mask(model.config, embeds, None, None, position_ids=position_ids).shape == (1, 9)
    both_ways = lambda b, h, q, kv: torch.ones_like(q + kv, dtype=torch.bool)  # noqa: E731
    assert not backend_mask.flagged_layers_under_causal_mask(config, both_ways, 1, 9, "cpu")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # no data-dependent check while tracing
    assert backend_mask.flagged_layers_under_causal_mask(config, both_ways, 1, 9, "cpu")
    assert not backend_mask.flagged_layers_under_causal_mask(model.config, both_ways, 1, 9, "cpu")


# ---------------------------------------------------------------------------------------------
# The exact path against a plain per-sequence reference
# ---------------------------------------------------------------------------------------------


def reference_attention(q, k, v, lengths, opts: AttentionOptions, sinks=None):
    """One sequence at a time, explicit mask and softmax. q `(M, H, D)`, k/v `(M, H_kv, D)`."""
    outputs, start = [], 0
    groups = q.shape[1] // k.shape[1]
    for n in lengths:
        qs = q[start : start + n].transpose(0, 1)
        ks = k[start : start + n].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[start : start + n].transpose(0, 1).repeat_interleave(groups, 0)
        logits = qs @ ks.transpose(-1, -2) * (opts.scaling or q.shape[-1] ** -0.5)
        if opts.softcap:
            logits = torch.tanh(logits / opts.softcap) * opts.softcap
        i = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if opts.causal:
            allowed &= i[:, None] >= i[None, :]
        if opts.sliding_window:
            allowed &= (i[:, None] - i[None, :]).abs() < opts.sliding_window
        logits = logits.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            logits = torch.cat([logits, sinks[:, None, None].expand(-1, n, 1)], dim=-1)
        probs = logits.softmax(-1)
        if sinks is not None:
            probs = probs[..., :-1]
        outputs.append((probs @ vs).transpose(0, 1))
        start += n
    return torch.cat(outputs)


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    kv_heads=st.sampled_from([1, 2, 4]),
    causal=st.booleans(),
    window=st.sampled_from([None, 1, 3, 8]),
    softcap=st.sampled_from([None, 5.0]),
    sinks=st.booleans(),
)
def test_exact_path_equals_per_sequence_reference(lengths, kv_heads, causal, window, softcap, sinks):
    torch.manual_seed(len(lengths))
    m = sum(lengths)
    q, k, v = torch.randn(m, 4, 8), torch.randn(m, kv_heads, 8), torch.randn(m, kv_heads, 8)
    sink = torch.randn(4) if sinks else None
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    layout = SequenceLayout(cu, max(lengths))
    opts = AttentionOptions(causal=causal, sliding_window=window, softcap=softcap, has_sinks=sinks)
    got = exact_varlen(q, k, v, layout, opts, sink)
    assert torch.allclose(got, reference_attention(q, k, v, lengths, opts, sink), atol=1e-5)


def test_buckets_group_similar_lengths():
    plans = buckets.plan_buckets([100, 95, 90, 20, 3, 2], buckets.ATTENTION_COST)
    widths = [g.shape[1] for g, _ in plans]
    assert widths[0] == 100 and len(plans) < 6
    covered = np.sort(np.concatenate([gather[i, :n] for gather, ls in plans for i, n in enumerate(ls)]))
    assert covered.tolist() == list(range(310))  # every token exactly once


# ---------------------------------------------------------------------------------------------
# Dispatch (CPU tests of the CUDA paths: availability, fallbacks, calling conventions)
# ---------------------------------------------------------------------------------------------


def fake_varlen(window_api: bool, gqa: bool):
    """A stand-in for torch's varlen_attn with the given API, computing via the reference."""

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, **kwargs):
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int(torch.diff(cu_q).max())
        if window_api:  # (left, right) keys around each query, -1 unbounded, as torch documents it
            left, right = kwargs["window_size"]
            causal = right == 0
            assert causal or right == left, f"a one-sided window {kwargs['window_size']} outside causal attention"
            window = None if left < 0 else left + 1
        else:
            causal, window = kwargs["is_causal"], None
        if k.shape[1] != q.shape[1]:
            assert gqa and kwargs.get("enable_gqa"), "grouped K/V given to a kernel without enable_gqa"
        opts = AttentionOptions(causal=causal, scaling=scale, sliding_window=window)
        return reference_attention(q, k, v, torch.diff(cu_q).tolist(), opts)

    if window_api:
        def api(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
            return varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                          enable_gqa=enable_gqa)
    elif gqa:
        def api(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False, enable_gqa=False):
            return varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, is_causal=is_causal,
                          enable_gqa=enable_gqa)
    else:
        def api(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
            return varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, is_causal=is_causal)
    return api


@pytest.mark.parametrize("window_api,gqa", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_varlen_calling_convention(window_api, gqa, window, causal):
    """Whatever the varlen_attn signature (is_causal / window_size, with or without GQA), results are exact,
    causal or bidirectional (a bidirectional window bounds both sides)."""
    if window and not window_api:
        pytest.skip("the is_causal API has no window: dispatch falls back (tested below)")
    lengths = [5, 12, 1, 9]
    torch.manual_seed(0)
    q, k, v = torch.randn(27, 4, 8), torch.randn(27, 2, 8), torch.randn(27, 2, 8)
    layout = SequenceLayout(torch.tensor([0, 5, 17, 18, 27], dtype=torch.int32), 12)
    opts = AttentionOptions(causal=causal, sliding_window=window, scaling=0.3)
    got = kernels.torch_varlen(q, k, v, layout, opts, fn=fake_varlen(window_api, gqa))
    assert torch.allclose(got, reference_attention(q, k, v, lengths, opts), atol=1e-5)


def test_flash_calling_convention():
    calls = {}

    def fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                   window_size=(-1, -1), softcap=0.0):
        calls.clear()
        calls.update(window_size=window_size, softcap=softcap, causal=causal, max=max_q)
        return q

    layout = SequenceLayout(torch.tensor([0, 5, 17], dtype=torch.int32), 12)
    q = torch.randn(17, 4, 8)
    kernels.flash_varlen(q, q, q, layout, AttentionOptions(sliding_window=4, softcap=30.0), fn=fake_flash)
    assert calls == {"window_size": (3, 0), "softcap": 30.0, "causal": True, "max": 12}
    kernels.flash_varlen(q, q, q, layout, AttentionOptions(sliding_window=64), fn=fake_flash)
    assert calls["window_size"] == (-1, -1)  # a window longer than every sequence is no window


@pytest.fixture
def on_cuda(monkeypatch):
    """Pretend flash-attn / varlen_attn availability; returns a setter."""

    def setup(flash=None, varlen=None):
        monkeypatch.setattr(kernels, "find_flash_varlen", lambda: flash)
        monkeypatch.setattr(kernels, "find_torch_varlen", lambda: varlen)

    return setup


def test_dispatch_order(on_cuda):
    bf16, opts = torch.bfloat16, AttentionOptions()
    assert kernels.choose_kernel("cpu", torch.float32, opts, True)[0] == kernels.EXACT
    on_cuda(flash=lambda *a, softcap=0.0, **k: None, varlen=fake_varlen(True, True))
    assert kernels.choose_kernel("cuda", bf16, opts, True)[0] == kernels.FLASH_VARLEN
    on_cuda(flash=None, varlen=fake_varlen(True, True))
    assert kernels.choose_kernel("cuda", bf16, opts, True)[0] == kernels.TORCH_VARLEN
    on_cuda(flash=None, varlen=None)
    kernel, reason = kernels.choose_kernel("cuda", bf16, opts, True)
    assert kernel == kernels.EXACT and "no varlen_attn" in reason


@pytest.mark.parametrize(
    "opts,dtype,why",
    [
        (AttentionOptions(softcap=30.0), torch.bfloat16, "softcap"),
        (AttentionOptions(has_sinks=True), torch.bfloat16, "sinks"),
        (AttentionOptions(dropout=0.1), torch.bfloat16, "dropout"),
        (AttentionOptions(), torch.float32, "float32"),
        (AttentionOptions(sliding_window=8), torch.bfloat16, "sliding window"),
    ],
)
def test_fallbacks_name_the_missing_feature(on_cuda, opts, dtype, why):
    on_cuda(flash=None, varlen=fake_varlen(window_api=False, gqa=True))  # an older torch: no window_size
    kernel, reason = kernels.choose_kernel("cuda", dtype, opts, True)
    assert kernel == kernels.EXACT and why in reason


def test_describe_reports_call_sites():
    model = tiny_model("llama")
    model(**PackedCollator()(features()))
    text = attention.describe()
    assert "LlamaAttention [cpu, float32]: exact-sdpa" in text
    assert "flash-attn:" in text and "varlen_attn:" in text


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernels against the exact path (run whenever CUDA is available)
# ---------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel", ["torch", "flash"])
@pytest.mark.parametrize("window", [None, 16])
def test_cuda_kernel_matches_exact_path(kernel, window):
    fn = kernels.torch_varlen if kernel == "torch" else kernels.flash_varlen
    if (kernel == "torch" and kernels.find_torch_varlen() is None) or (
        kernel == "flash" and kernels.find_flash_varlen() is None
    ):
        pytest.skip(f"{kernel} varlen kernel not available")
    lengths = [37, 200, 5, 128, 64]
    torch.manual_seed(0)
    m = sum(lengths)
    q, k, v = (torch.randn(m, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    layout = SequenceLayout(cu, max(lengths))
    opts = AttentionOptions(sliding_window=window)
    got = fn(q, k, v, layout, opts)
    want = exact_varlen(q.float(), k.float(), v.float(), SequenceLayout(cu, max(lengths)), opts)
    assert (got.float() - want).abs().max() < 2e-2
    got.float().square().sum().backward()
    grad_q = q.grad.clone()
    q.grad = None
    want.square().sum().backward()
    assert torch.allclose(grad_q.float(), q.grad.float(), atol=5e-2, rtol=5e-2)


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
    model = tiny_model("llama4_text")
    assert "chunked_attention" in model.config.layer_types
    result = compare_packed_unpacked(model, features(), reference_attn_implementation="eager", use_cache=use_cache)
    assert result.max_logit_diff < 1e-5 and result.max_grad_rel_diff < 1e-5


@pytest.mark.parametrize("term", attention.LOGIT_TERMS)
def test_logit_terms_the_backend_does_not_apply_are_refused(term):
    """A bias on the attention logits (Inkling's relative position bias and per-token sinks, T5's
    position_bias, ALiBi) would be silently dropped: the backend refuses it, naming the module."""
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 16)
    bias = torch.zeros(1, 4, 6, 6)
    with pytest.raises(ValueError, match=f"LlamaAttention passes '{term}', a term on the attention logits"):
        attention.packcollate_attention(module, q, q, q, None, **{term: bias})
    out, _ = attention.packcollate_attention(module, q, q, q, None, **{term: None})  # None: nothing to apply
    assert out.shape == (1, 6, 4, 16)
