"""The backend's mask function (`packcollate.backend.mask`), registered with transformers' `AttentionMaskInterface`:
a `(B, S)` sequence map found from `position_ids`, never an `S x S` matrix; layers flagged bidirectional under a
mask that is causal somewhere get transformers' own mask, and the backend keeps packed examples apart inside it."""

import pytest
import torch

import packcollate  # noqa: F401
from packcollate.backend import mask as backend_mask
from packcollate.backend import packcollate_attention
from packcollate.collate.vision import transformers_keeps_blocks_apart
from tests.helpers import tiny_backend_model as tiny_model


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
    sdpa = config.__class__(**config.to_dict())
    sdpa.use_bidirectional_attention, sdpa._attn_implementation = True, "sdpa"
    assert torch.equal(blocked, create_causal_mask(sdpa, embeds, None, None, position_ids=position_ids,
                                                   block_sequence_ids=prefix))  # transformers' own, whatever it is
    if transformers_keeps_blocks_apart():  # 5.24: the blocks stay in their sequence; 5.17: they reach across
        assert torch.equal(blocked[0, 0], (tril | in_prefix) & same)
    # the backend keeps the examples the kwargs name apart inside any 4-D mask (transformers 5.17's included)
    q = torch.randn(1, 2, 9, 8)
    out, _ = packcollate_attention(model.model.layers[0].self_attn, q, q, q, blocked, position_ids=position_ids)
    starts = [0, 3, 5, 9]
    for a, b in zip(starts, starts[1:]):
        alone, _ = packcollate_attention(model.model.layers[0].self_attn, q[:, :, a:b], q[:, :, a:b], q[:, :, a:b],
                                         blocked[:, :, a:b, a:b])
        torch.testing.assert_close(out[:, a:b], alone)
    assert create_bidirectional_mask(config, embeds, None) is None  # an encoder: linear, as before
    assert create_causal_mask(model.config, embeds, None, None, position_ids=position_ids).shape == (1, 9)
    both_ways = lambda b, h, q, kv: torch.ones_like(q + kv, dtype=torch.bool)  # noqa: E731
    assert not backend_mask.flagged_layers_under_causal_mask(config, both_ways, 1, 9, "cpu")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # no data-dependent check while tracing
    assert backend_mask.flagged_layers_under_causal_mask(config, both_ways, 1, 9, "cpu")
    assert not backend_mask.flagged_layers_under_causal_mask(model.config, both_ways, 1, 9, "cpu")


# Families whose attention layers get neither cu_seq_lens nor position_ids (GPTBigCode, Persimmon, CTRL), or that
# chunk or restart from the examples they are told of (Llama 4, Whisper's decoder): with a cache, transformers looks
# for no packed sequences in position_ids, so only the prepared model's own call can tell the mask where they are.
@pytest.mark.parametrize("model_type", ["gpt_bigcode", "persimmon", "ctrl", "llama4_text", "whisper"])
def test_a_cache_does_not_hide_the_packing_when_position_ids_are_its_only_carrier(model_type):
    from packcollate import PackedCollator
    from packcollate.compat import compare_packed_unpacked
    from tests.helpers import build_prepared

    model = build_prepared(model_type)
    features = [{"input_ids": list(range(3, 3 + n))} for n in (11, 27, 5, 19)]
    for use_cache in (True, False):
        result = compare_packed_unpacked(model, features, collator=PackedCollator(return_flash_attn_kwargs=False),
                                         reference_attn_implementation="eager", use_cache=use_cache)
        assert result.max_logit_diff <= 1e-4 and result.max_grad_rel_diff <= 1e-3, (use_cache, result)


def test_the_prepared_call_layout_reaches_the_mask_only_for_its_own_tokens():
    """The map comes from the call in progress on these `(B, S)` tokens: another shape (a tower's, BLT's patches)
    or no prepared call gets none."""
    from packcollate.backend import state
    from packcollate.backend.state import PackedForward
    from packcollate.layout import from_cu_seq_lens

    layout = from_cu_seq_lens(torch.tensor([0, 3, 8], dtype=torch.int32), 5, 1, 8)
    assert backend_mask._layout_starts(1, 8, "cpu") is None
    state.push(PackedForward(True, (1, 8), layout))
    try:
        assert backend_mask._layout_starts(1, 8, "cpu")[0].nonzero().flatten().tolist() == [0, 3]
        assert backend_mask._layout_starts(1, 7, "cpu") is None
    finally:
        state.pop()
    state.push(PackedForward(False, (1, 8), layout))  # another backend: as it is
    try:
        assert backend_mask._layout_starts(1, 8, "cpu") is None
    finally:
        state.pop()
