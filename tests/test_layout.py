"""The packed layout (`packcollate.layout`): its cache is bounded — a batch over the bound is not kept (a 20M-token
batch kept ~256 MiB for the process's life), the cache never holds more than `max_tokens` — and an entry goes
with its tensor. The layouts the backend refuses: backend/test_attention.py."""

from __future__ import annotations

import gc

import torch

from packcollate import layout
from tests.helpers import call, qkv

torch.set_num_threads(1)


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
