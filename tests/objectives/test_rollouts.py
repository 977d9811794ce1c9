"""Rollouts packed into one row (`packcollate.objectives.rollouts`): only real tokens of scored rollouts, in
order, each restarting its positions; per-token values back in their padded places; token-budget pieces
that add up to the whole (property test against a loop over the padded rows)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from packcollate.errors import InputError
from packcollate.objectives.rollouts import PackedRollouts

from ..helpers import PROPERTY

torch.set_num_threads(1)

PAD = 0


@st.composite
def padded_batches(draw):
    """TRL's layout: left-padded prompts (>= 1 token), right-padded completions, some masked out entirely."""
    rows = draw(st.integers(1, 6))
    prompts = draw(st.lists(st.integers(1, 5), min_size=rows, max_size=rows))
    completions = draw(st.lists(st.integers(0, 4), min_size=rows, max_size=rows))
    width_p, width_c = max(prompts), max(max(completions), 1)
    ids = torch.full((rows, width_p + width_c), PAD)
    mask = torch.zeros(rows, width_p + width_c, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        mask[i, width_p - p: width_p + c] = 1
    ids[mask.bool()] = torch.arange(1, int(mask.sum()) + 1)  # every real token distinct
    return ids, mask, width_c


@PROPERTY
@given(padded_batches(), st.integers(5, 12))
def test_packed_rollouts_equal_the_loop_over_padded_rows(batch, budget):
    ids, mask, width_c = batch
    rollouts = PackedRollouts.of(ids, mask, width_c)
    scored = [i for i in range(len(ids)) if mask[i, -width_c:].any()]
    if not scored:  # nothing to score: the first prompt alone, no label
        assert rollouts.input_ids[0].tolist() == ids[0][mask[0].bool()].tolist()
        assert (rollouts.labels == -100).all()
        return
    expected = [ids[i][mask[i].bool()].tolist() for i in scored]
    assert rollouts.input_ids[0].tolist() == sum(expected, [])
    assert rollouts.layout["position_ids"][0].tolist() == sum((list(range(len(e))) for e in expected), [])
    values = torch.rand(1, rollouts.num_tokens - 1)  # position j scores token j+1
    padded = rollouts.padded(values)
    aligned = torch.cat([torch.zeros(1), values[0]])
    for token, value in zip(rollouts.input_ids[0].tolist(), aligned.tolist(), strict=True):
        row, column = (ids == token).nonzero()[0].tolist()
        column -= ids.shape[1] - width_c
        if column >= 0:
            assert padded[row, column] == value
    assert int((padded != 0).sum()) <= int(mask[:, -width_c:].sum())
    longest = max(len(e) for e in expected)
    if longest > budget:
        with pytest.raises(InputError, match="expected at most max_tokens_per_batch"):
            rollouts.chunks(max_tokens=budget)
        return
    pieces = rollouts.chunks(max_tokens=budget)
    assert all(piece.num_tokens <= budget for piece in pieces)
    assert sum(piece.num_tokens for piece in pieces) == rollouts.num_tokens
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + piece.num_tokens)
    total = sum(piece.padded(aligned[start + 1: end].unsqueeze(0)) for piece, start, end in
                zip(pieces, offsets[:-1], offsets[1:], strict=True))
    assert torch.equal(total, padded)


def test_packed_rollouts_hold_only_real_tokens():
    """Left-padded prompts, right-padded completions, a masked-out completion: only real tokens of
    scored rollouts enter the row; per-token values return to their padded places."""
    pad = 0
    input_ids = torch.tensor([[pad, 5, 6, 7, 8, pad], [9, 10, 11, 12, 13, 14], [pad, pad, 15, 16, 17, 18]])
    attention_mask = (input_ids != pad).long()
    attention_mask[2, 3:] = 0  # its completion masked out (mask_truncated_completions)
    rollouts = PackedRollouts.of(input_ids, attention_mask, completion_width=3)
    assert rollouts.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert rollouts.labels.tolist() == [[-100, -100, 7, 8, -100, -100, -100, 12, 13, 14]]
    assert rollouts.layout["cu_seq_lens_q"].tolist() == [0, 4, 10]
    assert rollouts.layout["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    next_token = torch.arange(1.0, 10.0).unsqueeze(0)  # (1, N-1): position j scores token j+1
    assert rollouts.padded(next_token).tolist() == [[2.0, 3.0, 0.0], [7.0, 8.0, 9.0], [0.0, 0.0, 0.0]]
    pieces = rollouts.chunks(max_tokens=6)
    assert [piece.num_tokens for piece in pieces] == [4, 6]
    with pytest.raises(InputError, match=r"rollout 1: expected at most max_tokens_per_batch=5 tokens .* got 6"):
        rollouts.chunks(max_tokens=5)


def test_packed_rollouts_with_nothing_to_score_run_the_first_prompt():
    """Every completion masked out: the first prompt runs alone (a training step keeps its graph), scoring nothing."""
    input_ids = torch.tensor([[0, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    attention_mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    rollouts = PackedRollouts.of(input_ids, attention_mask, completion_width=2)
    assert rollouts.input_ids.tolist() == [[5, 6]] and rollouts.labels.tolist() == [[-100, -100]]
    assert rollouts.padded(torch.zeros(1, 1)).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_packed_rollouts_refuse_an_empty_prompt():
    input_ids = torch.tensor([[0, 0, 3, 4]])
    with pytest.raises(InputError, match="rollout 0: expected at least one prompt token"):
        PackedRollouts.of(input_ids, (input_ids != 0).long(), completion_width=2)

