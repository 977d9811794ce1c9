"""Attention layers that read the 4-D mask themselves run each packed example apart
(`packcollate.backend.restart`: sparse-attention indexers fed `attention_mask[:, 0]`, a block bias
concatenated to the mask, a dynamic mask built on it), and what the backend cannot prove refuses.

Every model is a tiny random copy of a real transformers architecture (CPU, fp32): the packed
forward and backward through `attn_implementation="packcollate"` must equal the same examples one at
a time through eager (logits 1e-4, relative gradients 1e-3), with `use_cache=False` (Trainer) and
`use_cache=True` (a plain loop). The overrides make each family's sparse path bite at these lengths:
examples longer and shorter than the indexer's top-k (8), Doge's dynamic window, DeepSeek-V4's
compressed windows. Families this transformers does not have are skipped (read at run time).
"""

import pytest
import torch
from transformers import CONFIG_MAPPING

from packcollate import PackedCollator
from packcollate.backend import restart
from packcollate.backend.attention import packcollate_attention
from packcollate.compat import compare_packed_unpacked, proof_features
from packcollate.errors import NotPreparedError, UnsupportedError
from tests.helpers import build_prepared as build
from tests.helpers import qkv, tiny_backend_model

pytestmark = pytest.mark.usefixtures("one_thread")

LOGITS, GRADS = 1e-4, 1e-3
# longer and shorter than the top-k of 8, two of one length (a bucket of two), several windows of 4
LENGTHS = (40, 3, 27, 11, 27, 5)

FAMILIES = {
    "deepseek_v32": {},
    "glm_moe_dsa": {},
    "hy_v4": {},
    "axk2": {},
    "dots3_note_text": {},
    "deepseek_v4": {"compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}},
    "doge": {"keep_window_size": 8},
}


def assert_exact(result):
    assert result.max_logit_diff <= LOGITS, result
    assert result.max_grad_rel_diff <= GRADS, result


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_packed_equals_one_at_a_time(model_type, use_cache):
    model = build(model_type, **FAMILIES[model_type])
    assert restart.mask_reading_layers(model), "no layer reading the mask found"
    result = compare_packed_unpacked(model, proof_features(lengths=LENGTHS), use_cache=use_cache,
                                     reference_attn_implementation="eager")
    assert_exact(result)


@pytest.mark.parametrize("model_type", ["deepseek_v32", "doge"])
def test_positions_only_and_gradient_checkpointing(model_type):
    """The layout from `position_ids` alone (no `cu_seq_lens`), and checkpointed layers recomputing it."""
    model = build(model_type, **FAMILIES[model_type])
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    collator = PackedCollator(return_flash_attn_kwargs=False)
    assert_exact(compare_packed_unpacked(model, proof_features(lengths=LENGTHS), collator=collator, use_cache=True))


def test_the_indexer_really_selects():
    """The control: the top-k bites at these lengths (its selection changes the output), so the equality
    above covers the selection inside each example."""
    model = build("deepseek_v32")
    wide = build("deepseek_v32", index_topk=64)
    ids = torch.tensor([proof_features(lengths=(40,))[0]["input_ids"]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - wide(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v4", "doge", "dots3_note_text"])
def test_unprepared_model_refuses_in_one_line(model_type):
    """Without `prepare`, the first packed forward raises from the mask function (every path: plain loop
    with a cache, Trainer, guard or none), naming the layers that read the mask."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"no {model_type!r} in this transformers")
    model = tiny_backend_model(model_type, **FAMILIES[model_type])
    batch = PackedCollator()(proof_features(lengths=LENGTHS), return_tensors="pt")
    for use_cache in (True, False):
        with pytest.raises(NotPreparedError) as error:
            model(**batch, use_cache=use_cache)
        message = str(error.value)
        assert "\n" not in message and "read the 4-D attention mask" in message
        assert "Attention" in message and "packcollate.prepare(model)" in message


class _Layer(torch.nn.Module):
    is_causal = True


def _packed_call(**kwargs):
    q, k, v = qkv(1, 12)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    return packcollate_attention(_Layer(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                 max_length_q=7, max_length_k=7, **kwargs)


def test_indices_over_a_packed_row_without_a_mask_refuse():
    """An indexer's top-k chosen over the whole packed row (no 4-D mask reached it) may point into another
    example: refused in one line naming the layer, never applied."""
    indices = torch.zeros(1, 12, 4, dtype=torch.int64)
    with pytest.raises(UnsupportedError, match=r"^attn_implementation='packcollate': _Layer passes 'indices'") as error:
        _packed_call(indices=indices)
    assert "\n" not in str(error.value)


def test_block_sparse_indices_refuse():
    with pytest.raises(UnsupportedError, match="_Layer passes 'block_indices'"):
        _packed_call(block_indices=torch.zeros(1, 2, 12, 1, dtype=torch.int64))


def test_a_mask_made_for_other_tokens_refuses():
    """A 4-D mask whose queries are not the call's (one example's mask reaching a layer that runs on the
    packed row): one line naming the layer, not a broadcast."""
    with pytest.raises(UnsupportedError, match=r"^attn_implementation='packcollate': _Layer hands a mask of shape"):
        _packed_call_with_mask(torch.zeros(1, 1, 7, 7))


def _packed_call_with_mask(mask):
    q, k, v = qkv(1, 12)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    return packcollate_attention(_Layer(), q, k, v, mask, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                                 max_length_k=7)


def test_indices_are_applied_on_one_sequence():
    """One sequence per row: the selected keys only, as eager folds them into the mask."""
    q, k, v = qkv(1, 6)
    indices = torch.tensor([[[0, 0], [0, 1], [1, 2], [0, 3], [2, 4], [1, 5]]])
    got = packcollate_attention(_Layer(), q, k, v, None, indices=indices)[0]
    allowed = torch.zeros(6, 6, dtype=torch.bool).scatter(-1, indices[0], True).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(got, expected.transpose(1, 2))


@pytest.mark.parametrize("model_type, layer", [("xlnet", "XLNetRelativeAttention"), ("cpmant", "CpmAntAttention")])
def test_attention_handed_another_sequence_inside_the_model_refuses(model_type, layer):
    """An attention layer that runs per example but is handed something else than the packed row inside
    the model's own call: XLNet's `(S, B, D)` layout, CPM-Ant's row with its prompt tokens prepended (and
    its own mask over all of it). Both trained on mixed examples before; now one line names the layer."""
    model = build(model_type)
    batch = PackedCollator()(proof_features(lengths=(11, 27, 5)), return_tensors="pt")
    for use_cache in (False, True):
        with pytest.raises(UnsupportedError, match=rf"^{layer}: ") as error:
            model(**batch, use_cache=use_cache)
        assert "\n" not in str(error.value)


READERS = {
    "index": "def forward(self, x, attention_mask):\n    return self.indexer(x, attention_mask[:, 0])",
    "concatenate": "def forward(self, x, attention_mask):\n    return torch.cat([attention_mask, x], -1)",
    "dtype": "def forward(self, x, mask=None):\n    if mask.dtype == torch.bool:\n        pass",
    "dynamic": "def f(self, x, attention_mask=None):\n    return x.masked_fill(attention_mask != 0, 0)",
}
PASSERS = {
    "pass on": "def forward(self, x, attention_mask):\n    return attention(self, x, x, x, attention_mask, scaling=1)",
    "keyword": "def forward(self, x, attention_mask=None):\n    return attention(x, attention_mask=attention_mask)",
    "none test": "def forward(self, x, attention_mask=None):\n    if attention_mask is None:\n        return x",
    "cross": "def forward(self, x, attention_mask, e=None):\n    m = attention_mask if e is None else e\n    return m",
    "default": "def forward(self, x, attention_mask=None):\n    masks = attention_mask or {}\n    return masks",
}


@pytest.mark.parametrize("name", list(READERS))
def test_a_layer_reading_the_mask_is_found(name):
    assert restart.mask_reads("class A:\n" + "\n".join("    " + line for line in READERS[name].splitlines()))


@pytest.mark.parametrize("name", list(PASSERS))
def test_a_layer_passing_the_mask_on_is_not(name):
    assert not restart.mask_reads("class A:\n" + "\n".join("    " + line for line in PASSERS[name].splitlines()))


def test_llama_is_untouched():
    """A model none of whose layers reads the mask keeps its attention on the packed row (no buckets)."""
    model = build("llama")
    assert restart.mask_reading_layers(model) == [] and restart.per_bucket_attention_layers(model) == []
    assert not restart.stateful_classes(type(model.config))
