"""Bidirectional blocks (`bidirectional_block_ids`) on the attention backend, against a dense reference.

Tokens of one block id (>= 0) inside one packed sequence see each other in both directions; every
other pair stays causal; a sliding window `W` bounds it as transformers' rule
`(q - k < W) & (k <= q | same block)`. The reference below builds that per-token allowed mask from
the test's own sequence ids, blocks and window and runs softmax attention in float64; the backend
(eager exact path and the traceable path `torch.compile` takes) must match it, forward and
gradients, for every layout source: `cu_seq_lens`, `position_ids`, one sequence per row, and padded
batches with a `(B, S)` padding mask or sequence map.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate.backend import attention, kernels
from packcollate.backend.attention import packcollate_attention
from packcollate.backend.kernels import AttentionOptions
from packcollate.backend.traced import traceable_attention
from packcollate.layout import BLOCK_IDS

torch.set_num_threads(1)
HEADS, DIM = 4, 4
TOL = {"atol": 1e-5, "rtol": 1e-5}


class _CausalLayer(torch.nn.Module):
    is_causal = True


class _EncoderLayer(torch.nn.Module):
    is_causal = False


CAUSAL = _CausalLayer().eval()
ENCODER = _EncoderLayer().eval()


# --- the reference ---------------------------------------------------------------------------


def reference_allowed(seq_ids: torch.Tensor, blocks: torch.Tensor, window: int | None) -> torch.Tensor:
    """`(B, S, S)` bool: query t may see key s. `seq_ids` `(B, S)`: the sequence of each token (0:
    padding), `blocks` `(B, S)`: block ids (-1: none)."""
    index = torch.arange(seq_ids.shape[1])
    distance = index[:, None] - index[None, :]  # q - k
    real = seq_ids != 0
    same_sequence = (seq_ids[:, :, None] == seq_ids[:, None, :]) & real[:, :, None] & real[:, None, :]
    same_block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    allowed = same_sequence & ((distance >= 0) | same_block)
    if window is not None:
        allowed = allowed & (distance < window)
    return allowed


def reference_attention(q, k, v, seq_ids, blocks, window) -> torch.Tensor:
    """Float64 softmax attention under `reference_allowed`: q `(B, H, S, D)`, k/v `(B, H_kv, S, D)`
    -> `(B, S, H, D)`, 0 on padding tokens."""
    allowed = reference_allowed(seq_ids, blocks, window)
    real = seq_ids != 0
    # a padding query sees only itself (finite), then its output is zeroed
    allowed = allowed | (torch.eye(seq_ids.shape[1], dtype=torch.bool) & ~real[:, :, None])
    groups = q.shape[1] // k.shape[1]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    logits = q64 @ k64.transpose(-1, -2) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v64
    return (out.transpose(1, 2) * real[:, :, None, None]).to(q.dtype)


def test_reference_mask_is_the_documented_rule():
    """The reference itself, on a hand-checked layout: one sequence of 6 tokens, block 0 on tokens
    1..4, window 2. Token 1 sees the future 2, 3, 4 (same block); token 4 does not see 1 or 2 (same
    block but beyond the window), sees 3 and itself; token 5 (no block) sees only 4 and itself; token
    0 sees only itself."""
    seq_ids = torch.ones(1, 6, dtype=torch.long)
    blocks = torch.tensor([[-1, 0, 0, 0, 0, -1]])
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(reference_allowed(seq_ids, blocks, 2)[0], want)
    # the same id in another sequence is not the same block
    seq_ids = torch.tensor([[1, 1, 2, 2]])
    allowed = reference_allowed(seq_ids, torch.tensor([[0, 0, 0, 0]]), None)[0]
    assert torch.equal(allowed, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool))


# --- layouts ---------------------------------------------------------------------------------

BLOCK_ID = st.sampled_from([-1, -1, 0, 1, 2])


@st.composite
def sequence_blocks(draw, max_runs: int = 4) -> list[int]:
    """The block ids of one sequence: runs of one id (contiguous blocks, -1 between them); an id may
    come back later in the sequence (a non-contiguous block). Length 1 to 16."""
    runs = draw(st.lists(st.tuples(st.integers(1, 4), BLOCK_ID), min_size=1, max_size=max_runs))
    return [block for length, block in runs for _ in range(length)]


WINDOWS = st.one_of(st.none(), st.integers(1, 6))
KV_HEADS = st.sampled_from([1, 2, 4])  # grouped-query attention: H_kv < H


def qkv(batch: int, seq: int, kv_heads: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, seq, DIM, generator=g, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, DIM, generator=g, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, DIM, generator=g, requires_grad=True)
    return q, k, v


def forward_and_grads(fn, q, k, v):
    """`fn(q, k, v)` `(B, S, H, D)` and the gradients of a fixed random projection of it."""
    out = fn(q, k, v)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    return out.detach(), grads


def assert_matches_reference(call, q, k, v, seq_ids, blocks, window):
    got, got_grads = forward_and_grads(call, q, k, v)
    want, want_grads = forward_and_grads(lambda q, k, v: reference_attention(q, k, v, seq_ids, blocks, window), q, k, v)
    torch.testing.assert_close(got, want, **TOL)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad {name}: {m}")


def layout_kwargs(lengths: list[int], source: str) -> dict:
    """The kwargs a packed `(1, N)` batch of `lengths` hands the backend from one layout source."""
    if source == "cu_seq_lens":
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    if source == "position_ids":
        return {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    assert source == "rows"  # nothing: the row is one sequence
    return {}


def both_paths(module, mask, opts: AttentionOptions, blocks: torch.Tensor, window, kwargs: dict):
    """The eager entry and the traceable path (called directly), each as `fn(q, k, v)`."""
    def eager(q, k, v):
        return packcollate_attention(module, q, k, v, mask, sliding_window=window, **kwargs, **{BLOCK_IDS: blocks})[0]

    def traced(q, k, v):
        full = blocks.expand(q.shape[0], q.shape[2])
        return traceable_attention(module, q, k, v, mask, opts, None, kwargs, full)

    return {"eager": eager, "traceable": traced}


# --- 1 + 2: packed layouts, every layout source ----------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sequences=st.lists(sequence_blocks(), min_size=1, max_size=4),
    window=WINDOWS,
    kv_heads=KV_HEADS,
    source=st.sampled_from(["cu_seq_lens", "position_ids", "rows"]),
    dtype=st.sampled_from([torch.int64, torch.int32]),
)
def test_packed_blocks_match_reference(sequences, window, kv_heads, source, dtype):
    """A packed row of 1-4 sequences with random blocks (contiguous, non-contiguous, one id in several
    sequences), windows from 1 (smaller than most blocks) to none, GQA: output and q/k/v gradients of
    the eager entry and of the traceable path equal the reference."""
    if source == "rows":
        sequences = sequences[:1]  # no layout kwargs: the row is one sequence
    lengths = [len(s) for s in sequences]
    seq = sum(lengths)
    seq_ids = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))[None]
    blocks = torch.tensor([b for s in sequences for b in s], dtype=dtype)[None]
    kwargs = layout_kwargs(lengths, source)
    opts = AttentionOptions(causal=True, sliding_window=window, bidirectional_blocks=True)
    q, k, v = qkv(1, seq, kv_heads)
    for name, call in both_paths(CAUSAL, None, opts, blocks, window, kwargs).items():
        try:
            assert_matches_reference(call, q, k, v, seq_ids, blocks, window)
        except AssertionError as error:
            raise AssertionError(f"{name} path, source {source}: {error}") from None


@st.composite
def padded_batches(draw):
    """A padded `(B, S)` batch: per row a list of sequences' block ids, and where padding goes."""
    kind = draw(st.sampled_from(["padding_mask", "padding_mask+position_ids", "sequence_map"]))
    rows = draw(st.lists(st.lists(sequence_blocks(max_runs=3), min_size=1, max_size=1 if kind == "padding_mask" else 3),
                         min_size=2, max_size=3))
    extra = draw(st.integers(0, 3))
    left = kind == "padding_mask" and draw(st.booleans())
    return kind, rows, extra, left


@settings(max_examples=50, deadline=None)
@given(batch=padded_batches(), window=WINDOWS, kv_heads=KV_HEADS, mask_bool=st.booleans())
def test_padded_batch_blocks_match_reference(batch, window, kv_heads, mask_bool):
    """B > 1 rows with padding (left or right), a `(B, S)` mask given directly: 0/1 padding (one
    sequence a row, or several told apart by restarting `position_ids`), or a sequence map (a new id
    per sequence, 0 on padding). Blocks on real tokens only; padding tokens give 0; output and
    gradients equal the reference on both paths."""
    kind, rows, extra, left = batch
    seq = max(sum(len(s) for s in row) for row in rows) + extra
    seq_ids = torch.zeros(len(rows), seq, dtype=torch.long)
    blocks = torch.full((len(rows), seq), -1, dtype=torch.long)
    positions = torch.zeros(len(rows), seq, dtype=torch.long)
    next_id = 1
    for r, row in enumerate(rows):
        used = sum(len(s) for s in row)
        at = seq - used if left else 0
        for sequence in row:
            n = len(sequence)
            seq_ids[r, at : at + n] = next_id
            blocks[r, at : at + n] = torch.tensor(sequence)
            positions[r, at : at + n] = torch.arange(n)
            next_id, at = next_id + 1, at + n
    mask = seq_ids if kind == "sequence_map" else (seq_ids != 0).long()
    mask = mask.bool() if mask_bool and kind != "sequence_map" else mask
    kwargs = {"position_ids": positions} if kind == "padding_mask+position_ids" else {}
    opts = AttentionOptions(causal=True, sliding_window=window, bidirectional_blocks=True)
    q, k, v = qkv(len(rows), seq, kv_heads)
    for name, call in both_paths(CAUSAL, mask, opts, blocks, window, kwargs).items():
        try:
            assert_matches_reference(call, q, k, v, seq_ids, blocks, window)
        except AssertionError as error:
            raise AssertionError(f"{name} path, {kind}: {error}") from None
        assert torch.equal(call(q, k, v)[seq_ids == 0], torch.zeros(int((seq_ids == 0).sum()), HEADS, DIM))


def test_blocks_change_the_output_and_stay_inside_their_sequence():
    """The feature is exercised: a block's earlier tokens see its later ones (their output changes),
    while a second sequence carrying the same id, and the tokens before the block, do not change."""
    lengths = [3, 6, 5]
    blocks = torch.tensor([[-1, -1, -1, -1, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1]])
    other = blocks.clone()
    other[0, 10:13] = 0  # the same id in the third sequence
    kwargs = layout_kwargs(lengths, "cu_seq_lens")
    q, k, v = (t.detach() for t in qkv(1, sum(lengths), 2))
    plain = packcollate_attention(CAUSAL, q, k, v, None, **kwargs)[0]
    with_block = packcollate_attention(CAUSAL, q, k, v, None, **kwargs, **{BLOCK_IDS: blocks})[0]
    changed = (plain - with_block).abs().amax(dim=(0, 2, 3)) > 1e-4
    assert changed.tolist() == [i in (4, 5) for i in range(14)]  # the block's first two tokens; the last saw all
    both = packcollate_attention(CAUSAL, q, k, v, None, **kwargs, **{BLOCK_IDS: other})[0]
    torch.testing.assert_close(both[:, :9], with_block[:, :9], atol=0, rtol=0)  # sequence 3's block does not leak


# --- 3: under torch.compile ------------------------------------------------------------------


def test_compiled_entry_equals_eager_with_blocks():
    """`torch.compile(dynamic=True)` around a function calling the backend (so the traceable path
    runs) gives the eager result, forward and gradients, for two packed layouts of different sizes."""
    torch._dynamo.reset()

    def attend(q, k, v, cu, blocks):
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
        return packcollate_attention(CAUSAL, q, k, v, None, sliding_window=3, **kwargs, **{BLOCK_IDS: blocks})[0]

    compiled = torch.compile(attend, backend="eager", dynamic=True, fullgraph=True)
    cases = [
        ([4, 1, 7], [-1, 0, 0, -1, 1, -1, 0, 0, 0, 0, -1, 0]),
        ([6, 3, 2, 5], [0] * 6 + [0, -1, 0] + [2, 2] + [-1, 1, 1, 1, 1]),
    ]
    for lengths, ids in cases:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        blocks = torch.tensor([ids])
        q, k, v = qkv(1, sum(lengths), 2)
        want, want_grads = forward_and_grads(lambda q, k, v: attend(q, k, v, cu, blocks), q, k, v)
        got, got_grads = forward_and_grads(lambda q, k, v: compiled(q, k, v, cu, blocks), q, k, v)
        torch.testing.assert_close(got, want, **TOL)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, **TOL)
    torch._dynamo.reset()


# --- 4: where blocks do not apply ------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False], ids=["is_causal=False", "non-causal layer"])
def test_a_bidirectional_call_ignores_blocks(declared):
    """`is_causal=False` passed by the caller, or a layer whose module says `is_causal=False`, attends both
    ways already: blocks change nothing, eager or traceable; the same blocks do change a causal call."""
    kwargs = {**layout_kwargs([5, 4], "cu_seq_lens"), **({"is_causal": False} if declared else {})}
    module = CAUSAL if declared else ENCODER
    blocks = torch.tensor([[0, 0, -1, 1, 1, 0, 0, 1, -1]])
    q, k, v = (t.detach() for t in qkv(1, 9, 2))
    for window in (None, 2):
        plain = packcollate_attention(module, q, k, v, None, sliding_window=window, **kwargs)[0]
        got = packcollate_attention(module, q, k, v, None, sliding_window=window, **kwargs, **{BLOCK_IDS: blocks})[0]
        assert torch.equal(got, plain)
    opts = AttentionOptions(causal=False)
    plain = traceable_attention(module, q, k, v, None, opts, None, kwargs)
    assert torch.equal(traceable_attention(module, q, k, v, None, opts, None, kwargs, blocks[0:1]), plain)
    causal_kwargs = layout_kwargs([5, 4], "cu_seq_lens")
    causal = packcollate_attention(CAUSAL, q, k, v, None, **causal_kwargs)[0]
    assert not torch.allclose(packcollate_attention(CAUSAL, q, k, v, None, **causal_kwargs, **{BLOCK_IDS: blocks})[0], causal)


def test_decoding_call_ignores_blocks():
    """A decode step (`S_kv > S`, no mask) is dense over the cache: block ids (of the prompt, or of
    the new tokens) change nothing."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, 2, DIM, generator=g)
    k, v = torch.randn(1, 2, 6, DIM, generator=g), torch.randn(1, 2, 6, DIM, generator=g)
    for window in (None, 3):
        plain = packcollate_attention(CAUSAL, q, k, v, None, sliding_window=window)[0]
        for blocks in (torch.tensor([[0, 0]]), torch.tensor([[0, 0, 0, 0, 0, 0]])):
            got = packcollate_attention(CAUSAL, q, k, v, None, sliding_window=window, **{BLOCK_IDS: blocks})[0]
            assert torch.equal(got, plain)


# --- 5: dispatch -----------------------------------------------------------------------------


def test_blocks_dispatch_to_the_exact_kernel_even_with_fast_kernels(monkeypatch):
    """On CUDA with flash-attn and varlen_attn both present, a bf16 call with blocks takes the
    exact path and says why; the same call without blocks would take flash-attn."""
    dummy = lambda *args, **kwargs: None  # noqa: E731
    monkeypatch.setattr(kernels, "find_flash_varlen", lambda: dummy)
    monkeypatch.setattr(kernels, "find_torch_varlen", lambda: dummy)
    kernel, reason = kernels.choose_kernel("cuda", torch.bfloat16, AttentionOptions(bidirectional_blocks=True), True)
    assert kernel == kernels.EXACT
    assert "bidirectional blocks" in reason and BLOCK_IDS in reason
    assert kernels.choose_kernel("cuda", torch.bfloat16, AttentionOptions(), True)[0] == kernels.FLASH_VARLEN
    monkeypatch.setattr(kernels, "find_flash_varlen", lambda: None)
    opts = AttentionOptions(bidirectional_blocks=True, sliding_window=4)
    assert kernels.choose_kernel("cuda", torch.float16, opts, True)[0] == kernels.EXACT


def test_the_entry_tells_dispatch_about_blocks(monkeypatch):
    """`packcollate_attention` hands dispatch options with `bidirectional_blocks` set exactly when a
    prefill call not declared bidirectional carries block ids, so on CUDA it cannot reach a varlen kernel."""
    seen = []
    real_decide = attention.decide

    def recording_decide(device_type, dtype, opts, *rest):
        seen.append(opts)
        return real_decide(device_type, dtype, opts, *rest)

    monkeypatch.setattr(attention, "decide", recording_decide)
    kwargs = layout_kwargs([3, 4], "cu_seq_lens")
    q, k, v = (t.detach() for t in qkv(1, 7, 2))
    blocks = torch.tensor([[0, 0, -1, 1, 1, -1, -1]])
    packcollate_attention(CAUSAL, q, k, v, None, **kwargs, **{BLOCK_IDS: blocks})
    packcollate_attention(CAUSAL, q, k, v, None, **kwargs)
    packcollate_attention(ENCODER, q, k, v, None, **kwargs, **{BLOCK_IDS: blocks})
    packcollate_attention(CAUSAL, q, k, v, None, **kwargs, is_causal=False, **{BLOCK_IDS: blocks})
    assert [opts.bidirectional_blocks for opts in seen] == [True, False, False, False]
    dummy = lambda *args, **kwargs: None  # noqa: E731
    monkeypatch.setattr(kernels, "find_flash_varlen", lambda: dummy)
    assert kernels.choose_kernel("cuda", torch.bfloat16, seen[0], True)[0] == kernels.EXACT


# --- 6: bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("blocks, message", [
    (torch.full((1, 8), -1), r"bidirectional_block_ids: expected shape \(1, 7\) or \(1, 7\) .*got \(1, 8\)"),
    (torch.full((2, 7), -1), r"bidirectional_block_ids: expected shape \(1, 7\) or \(1, 7\) .*got \(2, 7\)"),
    (torch.full((7,), -1), r"bidirectional_block_ids: expected shape \(1, 7\) or \(1, 7\) .*got \(7,\)"),
    (torch.full((1, 1, 7), -1), r"bidirectional_block_ids: expected shape .*got \(1, 1, 7\)"),
    (torch.full((1, 7), -1.0), r"bidirectional_block_ids: expected an integer tensor .*got dtype torch\.float32"),
    (torch.zeros(1, 7, dtype=torch.bool), r"bidirectional_block_ids: expected an integer tensor .*got dtype torch\.bool"),
    ([[-1] * 7], r"bidirectional_block_ids: expected a \(1, 7\) integer torch tensor, got list"),
    ((0, 0, 0), r"bidirectional_block_ids: expected a \(1, 7\) integer torch tensor, got tuple"),
])
def test_malformed_blocks_are_refused(blocks, message):
    q, k, v = (t.detach() for t in qkv(1, 7, 2))
    with pytest.raises(ValueError, match=message):
        packcollate_attention(CAUSAL, q, k, v, None, **layout_kwargs([3, 4], "cu_seq_lens"), **{BLOCK_IDS: blocks})


def test_padded_batch_names_its_shape():
    g = torch.Generator().manual_seed(0)
    q = k = v = torch.randn(3, 2, 5, DIM, generator=g)
    with pytest.raises(ValueError, match=r"bidirectional_block_ids: expected shape \(3, 5\) or \(1, 5\) .*got \(2, 5\)"):
        packcollate_attention(CAUSAL, q, k, v, torch.ones(3, 5, dtype=torch.long),
                              **{BLOCK_IDS: torch.zeros(2, 5, dtype=torch.long)})


# --- 7: no block at all ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["cu_seq_lens", "position_ids", "rows", "padded"])
@pytest.mark.parametrize("window", [None, 2])
def test_all_minus_one_equals_no_blocks(source, window):
    """Block ids of -1 everywhere give exactly the output of a call without them (eager and traceable)."""
    lengths = [6] if source == "rows" else [1, 5, 3, 6]
    if source == "padded":
        batch, seq, kwargs = 2, 8, {}
        mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    else:
        batch, seq, kwargs, mask = 1, sum(lengths), layout_kwargs(lengths, source), None
    q, k, v = (t.detach() for t in qkv(batch, seq, 2))
    none = torch.full((batch, seq), -1)
    plain = packcollate_attention(CAUSAL, q, k, v, mask, sliding_window=window, **kwargs)[0]
    got = packcollate_attention(CAUSAL, q, k, v, mask, sliding_window=window, **kwargs, **{BLOCK_IDS: none})[0]
    assert torch.equal(got, plain)
    opts = AttentionOptions(causal=True, sliding_window=window)
    plain = traceable_attention(CAUSAL, q, k, v, mask, opts, None, kwargs)
    with_blocks = AttentionOptions(causal=True, sliding_window=window, bidirectional_blocks=True)
    got = traceable_attention(CAUSAL, q, k, v, mask, with_blocks, None, kwargs, none)
    assert torch.equal(got, plain)
