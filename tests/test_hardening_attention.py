"""The attention backend refuses a malformed layout in one clear ValueError instead of mixing
examples (or failing deep in a kernel), honours a 2-D padding mask given directly, and its layout
cache neither goes stale after edits that bypass the version counter nor grows without bound."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate import layout
from packcollate.backend import attention
from packcollate.backend.attention import packcollate_attention

torch.set_num_threads(1)
HEADS, DIM = 2, 8


class _Layer(torch.nn.Module):
    is_causal = True


LAYER = _Layer().eval()


def qkv(batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, seq, DIM, generator=g) for _ in range(3)]


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


def call(q, k, v, mask=None, **kwargs):
    return packcollate_attention(LAYER, q, k, v, mask, **kwargs)[0]


# --- cu_seq_lens -----------------------------------------------------------------------------


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


# --- position_ids and 2-D masks ----------------------------------------------------------------


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


# --- the layout cache --------------------------------------------------------------------------


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


def test_layout_cache_is_bounded_and_released(monkeypatch):
    """A batch over the bound is not kept (today a 20M-token batch keeps ~256 MiB for the process's
    life); the cache never holds more than `max_tokens`, and an entry goes with its tensor."""
    cache = layout.LayoutCache(size=8, max_tokens=64)
    monkeypatch.setattr(layout, "_CACHE", cache)
    q, k, v = qkv(1, 100)
    big = torch.tensor([0, 50, 100], dtype=torch.int32)
    call(q, k, v, cu_seq_lens_q=big)
    assert cache.tokens() == 0 and not cache.entries
    q, k, v = qkv(1, 30)
    kept = [torch.tensor([0, 10, 30], dtype=torch.int32) for _ in range(4)]
    for cu in kept:
        call(q, k, v, cu_seq_lens_q=cu)
        assert cache.tokens() <= 64
    assert len(cache.entries) == 2  # 2 x 30 tokens fit, the oldest went
    del kept, cu
    gc.collect()
    assert not cache.entries


def test_default_cache_bound_is_below_a_20m_token_batch():
    assert layout.LayoutCache().max_tokens < 20_000_000
