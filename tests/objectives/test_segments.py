"""Segment reductions over a packed row (`packcollate.objectives.segments`) equal the loop over its examples (property tests), and
their gradients are those of the loop."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate.objectives.segments import (
    from_padded,
    segment_ids,
    segment_last,
    segment_last_index,
    segment_mean,
    segment_sum,
    to_padded,
    token_logprobs,
)

torch.set_num_threads(1)

lengths_st = st.lists(st.integers(1, 9), min_size=1, max_size=7)


def offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def pieces(values, lengths):
    return list(torch.split(values, lengths))


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, width=st.integers(1, 3), seed=st.integers(0, 2**16), leading=st.booleans())
def test_sum_mean_last_match_the_loop(lengths, width, seed, leading):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    values = torch.randn(n, width, generator=g, dtype=torch.float64)
    values = values[:, 0] if width == 1 else values  # (N,) per-token scalars, or (N, D)
    mask = torch.rand(n, generator=g) < 0.6
    cu = offsets(lengths)
    given_values = values.unsqueeze(0) if leading else values
    expect_sum = torch.stack([p.sum(0) for p in pieces(values, lengths)])
    expect_mean = torch.stack([p.mean(0) for p in pieces(values, lengths)])
    expect_masked = torch.stack([
        (p[m].sum(0) / max(int(m.sum()), 1)) for p, m in zip(pieces(values, lengths), pieces(mask, lengths))
    ])
    expect_last = torch.stack([p[-1] for p in pieces(values, lengths)])
    torch.testing.assert_close(segment_sum(given_values, cu), expect_sum)
    torch.testing.assert_close(segment_mean(given_values, cu), expect_mean)
    torch.testing.assert_close(segment_mean(given_values, cu, mask=mask), expect_masked)
    torch.testing.assert_close(segment_last(given_values, cu), expect_last)
    assert segment_ids(cu).tolist() == [i for i, l in enumerate(lengths) for _ in range(l)]


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, seed=st.integers(0, 2**16))
def test_last_masked_token_is_hf_pooling_rule(lengths, seed):
    """With a mask, the rightmost True per segment; none True -> the segment's first token (what a
    sequence-classification head picks: argmax of `positions * mask`)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(sum(lengths), generator=g) < 0.5
    cu = offsets(lengths)
    expect = []
    for start, m in zip(cu[:-1].tolist(), pieces(mask, lengths)):
        positions = torch.arange(len(m))
        expect.append(start + int((positions * m).argmax()))
    assert segment_last_index(cu, mask).tolist() == expect


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, vocab=st.integers(2, 11), seed=st.integers(0, 2**16))
def test_token_logprobs_match_per_example_cross_entropy(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logits = torch.randn(1, n, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (1, n), generator=g)
    labels[torch.rand(1, n, generator=g) < 0.3] = -100
    cu = offsets(lengths)
    out = token_logprobs(logits, labels, cu)
    assert out.shape == (1, n)
    for start, length in zip(cu[:-1].tolist(), lengths):
        logit, label = logits[0, start : start + length], labels[0, start : start + length]
        expect = -torch.nn.functional.cross_entropy(logit[:-1], label[1:], reduction="none", ignore_index=-100)
        torch.testing.assert_close(out[0, start + 1 : start + length], expect)
        assert out[0, start] == 0  # never predicted from the previous example


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, seed=st.integers(0, 2**16))
def test_padded_round_trip(lengths, seed):
    values = torch.randn(1, sum(lengths), 2, generator=torch.Generator().manual_seed(seed))
    cu = offsets(lengths)
    padded = to_padded(values, cu, fill=-7.0)
    assert padded.shape == (len(lengths), max(lengths), 2)
    for row, (p, length) in enumerate(zip(pieces(values[0], lengths), lengths)):
        assert torch.equal(padded[row, :length], p) and (padded[row, length:] == -7.0).all()
    assert torch.equal(from_padded(padded, cu), values)


def test_gradients_equal_the_loop():
    lengths = [3, 1, 5, 2]
    cu = offsets(lengths)
    values = torch.randn(sum(lengths), 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(len(lengths), 4, dtype=torch.float64)
    ours = [(segment_sum(values, cu) * weights).sum(), (segment_mean(values, cu) * weights).sum(),
            (segment_last(values.unsqueeze(0), cu) * weights).sum(),
            (to_padded(values, cu) ** 2).sum()]
    loops = [sum((p.sum(0) * w).sum() for p, w in zip(pieces(values, lengths), weights)),
             sum((p.mean(0) * w).sum() for p, w in zip(pieces(values, lengths), weights)),
             sum((p[-1] * w).sum() for p, w in zip(pieces(values, lengths), weights)),
             (values ** 2).sum()]
    for a, b in zip(ours, loops):
        ga, = torch.autograd.grad(a, values)
        gb, = torch.autograd.grad(b, values)
        torch.testing.assert_close(ga, gb)


def test_masked_tokens_do_not_leak_nan():
    values = torch.tensor([1.0, float("nan"), 2.0])
    assert segment_sum(values, torch.tensor([0, 2, 3]), mask=torch.tensor([True, False, True])).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("cu, message", [
    (torch.tensor([0, 2, 4]), "N=4 from cu_seq_lens, got shape \\(5,\\)"),
    (torch.tensor([1, 5]), "first 1"),
    (torch.tensor([0, 3, 3, 5]), "empty or negative segments at \\[1\\]"),
    (torch.tensor([[0, 5]]), "1-D"),
])
def test_bad_offsets_are_named(cu, message):
    with pytest.raises(ValueError, match=message):
        segment_sum(torch.ones(5), cu)


@pytest.mark.parametrize("label", [-1, 7, 100])
def test_token_logprobs_refuses_labels_outside_the_vocabulary(label):
    """[17] H3: a label -1 (or >= V) used to be gathered as token 0 (clamped); only ids in [0, V) or -100."""
    logits, labels = torch.randn(1, 4, 7), torch.tensor([[1, 2, label, -100]])
    with pytest.raises(ValueError, match=rf"labels: expected token ids in \[0, 7\).*got {label} at token 2"):
        token_logprobs(logits, labels, torch.tensor([0, 4]))


@pytest.mark.parametrize("cu, message", [
    (torch.tensor([0.0, 2.5, 5.0]), "expected integer offsets .*got dtype torch.float32"),
    (torch.tensor([0, 4, 2, 5]), "empty or negative segments at \\[1\\]"),
])
@pytest.mark.parametrize("reduce", ["sum", "lengths", "starts", "padding_mask", "last"])
def test_float_or_decreasing_offsets_are_refused_everywhere(cu, message, reduce):
    """[17]: float offsets were truncated (`.long()`), and segment_lengths / segment_starts / padding_mask
    took decreasing offsets as negative segments."""
    from packcollate.objectives.segments import (
        padding_mask,
        segment_lengths,
        segment_starts,
    )

    call = {"sum": lambda: segment_sum(torch.ones(5), cu), "lengths": lambda: segment_lengths(cu),
            "starts": lambda: segment_starts(cu, 5), "padding_mask": lambda: padding_mask(cu),
            "last": lambda: segment_last_index(cu)}[reduce]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("mask", [torch.tensor([1, 2, 0, 1, 1]), torch.tensor([1.0, 0.5, 0.0, 1.0, 1.0])])
def test_masks_that_are_not_0_or_1_are_refused(mask):
    """[17]: a mask of 2 or 0.5 was read as True."""
    cu = torch.tensor([0, 2, 5])
    for call in (lambda: segment_sum(torch.ones(5), cu, mask), lambda: segment_mean(torch.ones(5), cu, mask),
                 lambda: segment_last_index(cu, mask)):
        with pytest.raises(ValueError, match="mask: expected True/False or 0/1 values, got (2|0.5)"):
            call()
    assert segment_sum(torch.ones(5), cu, torch.tensor([1, 0, 0, 1, 1])).tolist() == [1.0, 2.0]
