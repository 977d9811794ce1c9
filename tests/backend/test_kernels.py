"""The attention kernels (`packcollate.backend.kernels`): the exact path against a plain per-sequence reference,
the calling conventions of flash-attn's and PyTorch's varlen kernels (CPU stand-ins), which kernel a call is
dispatched to and why it falls back, and on CUDA the real kernels against the exact path."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import packcollate  # noqa: F401
from packcollate.backend import kernels
from packcollate.backend.kernels import AttentionOptions, LogitTerms, exact_varlen
from packcollate.layout import SequenceLayout
from tests.helpers import cuda

# ---------------------------------------------------------------------------------------------
# The exact path against a plain per-sequence reference
# ---------------------------------------------------------------------------------------------


def reference_attention(q, k, v, lengths, opts: AttentionOptions, sinks=None, bias=None, token_sinks=None):
    """One sequence at a time, explicit mask and softmax. q `(M, H, D)`, k/v `(M, H_kv, D)`; `bias` `(H, M, M)`
    and `token_sinks` `(H, M)` over all tokens, cut to each sequence."""
    outputs, start = [], 0
    groups = q.shape[1] // k.shape[1]
    for n in lengths:
        qs = q[start : start + n].transpose(0, 1)
        ks = k[start : start + n].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[start : start + n].transpose(0, 1).repeat_interleave(groups, 0)
        logits = qs @ ks.transpose(-1, -2) * (opts.scaling or q.shape[-1] ** -0.5)
        if opts.softcap:
            logits = torch.tanh(logits / opts.softcap) * opts.softcap
        if bias is not None:
            logits = logits + bias[:, start : start + n, start : start + n]
        if token_sinks is not None:
            sinks_of = token_sinks[:, start : start + n, None]
        i = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if opts.causal:
            allowed &= i[:, None] >= i[None, :]
        if opts.sliding_window:
            allowed &= (i[:, None] - i[None, :]).abs() < opts.sliding_window
        logits = logits.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sinks_of = sinks[:, None, None].expand(-1, n, 1)
        if sinks is not None or token_sinks is not None:
            logits = torch.cat([logits, sinks_of], dim=-1)
        probs = logits.softmax(-1)
        if sinks is not None or token_sinks is not None:
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


@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    window=st.sampled_from([None, 3]),
    token_sinks=st.booleans(),
    pad=st.integers(0, 3),
)
def test_logit_terms_are_cut_to_each_sequence(lengths, window, token_sinks, pad):
    """A bias over every query/key pair of the row `(1, H, S, S)` (Inkling's relative position bias) and
    per-token sinks `(1, H, S, 1)` (Inkling 2) reach each sequence's own pairs and tokens, whatever the
    buckets (a trailing pad segment outside the layout included)."""
    torch.manual_seed(len(lengths))
    m = sum(lengths)
    q, k, v = torch.randn(m, 4, 8), torch.randn(m, 2, 8), torch.randn(m, 2, 8)
    bias = torch.randn(1, 4, m + pad, m + pad)
    sinks = torch.randn(1, 4, m + pad, 1) if token_sinks else None
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    layout = SequenceLayout(cu, max(lengths), torch.arange(m) if pad else None)
    opts = AttentionOptions(sliding_window=window, has_sinks=token_sinks, has_bias=True)
    got = exact_varlen(q, k, v, layout, opts, sinks, terms=LogitTerms(bias, sinks), seq=m + pad)
    want = reference_attention(q, k, v, lengths, opts, bias=bias[0, :, :m, :m],
                               token_sinks=None if sinks is None else sinks[0, :, :m, 0])
    assert torch.allclose(got, want, atol=1e-5)


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
        (AttentionOptions(has_bias=True), torch.bfloat16, "position_bias"),
    ],
)
def test_fallbacks_name_the_missing_feature(on_cuda, opts, dtype, why):
    on_cuda(flash=None, varlen=fake_varlen(window_api=False, gqa=True))  # an older torch: no window_size
    kernel, reason = kernels.choose_kernel("cuda", dtype, opts, True)
    assert kernel == kernels.EXACT and why in reason


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernels against the exact path (run whenever CUDA is available)
# ---------------------------------------------------------------------------------------------


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
