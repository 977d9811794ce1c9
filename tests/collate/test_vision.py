"""`PackedVisionCollator` (`packcollate.collate.vision`): what a packed image+text batch holds.

Per-example rotary positions equal the model's own (`get_rope_index`; PaliGemma's are 1-indexed); the
vision inputs are concatenated in example order (the images of the Pixtral-tower families and of
LLaVA-NeXT / OneVision zero-padded to the largest, each example with its `image_sizes`); the vision tower
never sees the text layout; inputs are never written to; bad inputs, and bidirectional image blocks the
model could not keep apart, are refused with the example and the key.

Every family is a tiny random copy built from its config (no downloads); Qwen-family images go through a
locally built `Qwen2VLImageProcessor`. That a packed batch equals one example at a time: compat/test_vision.py.
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate.collate.vision import PACKING_KWARGS, PackedVisionCollator
from packcollate.compat.vision import (
    image_example,
    qwen_image_processor,
    vision_proof_features,
)
from packcollate.layout import BLOCK_IDS
from tests.helpers import gemma3_with_window
from tests.helpers import vision_model as model_of

torch.set_num_threads(1)


MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v")


@pytest.mark.parametrize("family", MROPE_FAMILIES)
def test_positions_are_the_models_rope_index_per_example(family):
    model = model_of(family)
    features = vision_proof_features(model.config, seed=3)
    batch = PackedVisionCollator(model=model)(features)
    positions = batch["position_ids"]
    assert positions.shape == (4, 1, sum(len(f["input_ids"]) for f in features))
    start = 0
    for f in features:
        ids = torch.tensor([f["input_ids"]])
        types = (ids == model.config.image_token_id).long()
        kwargs = {"image_grid_thw": f["image_grid_thw"]} if "image_grid_thw" in f else {}
        expected, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, **kwargs)
        got = positions[:, 0, start:start + ids.shape[1]]
        assert torch.equal(got[0], torch.arange(ids.shape[1]))  # text row restarts at every example
        assert torch.equal(got[1:], expected[:, 0])
        start += ids.shape[1]


@pytest.mark.parametrize("family", MROPE_FAMILIES)
def test_vision_tower_keeps_images_apart(family):
    """All images of a batch in one vision call == each image through the tower alone."""
    model = model_of(family)
    features = vision_proof_features(model.config, seed=4)
    batch = PackedVisionCollator(model=model)(features)
    with torch.no_grad():
        together = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        patches = (batch["image_grid_thw"].prod(-1)).tolist()
        alone = [
            torch.cat(model.model.get_image_features(pixels, grid[None]).pooler_output)
            for pixels, grid in zip(batch["pixel_values"].split(patches), batch["image_grid_thw"])
        ]
    assert len(patches) >= 3
    assert (together - torch.cat(alone)).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llava", "gemma3", "idefics3"])
def test_vision_tower_never_sees_the_text_layout(family):
    model = model_of(family)
    seen = []
    collator = PackedVisionCollator(model=model)  # hooks the tower
    tower = next(m for n, m in model.named_modules() if getattr(m, "_packcollate_shielded", False))
    handle = tower.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    try:
        batch = collator(vision_proof_features(model.config, token_type_ids=True))
        assert "cu_seq_lens_q" in batch and (family != "gemma3" or BLOCK_IDS in batch)
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    assert seen and not any(key in keys for keys in seen for key in PACKING_KWARGS)


def test_vision_inputs_concatenated_in_example_order():
    model = model_of("qwen2_vl")
    features = vision_proof_features(model.config, seed=5)
    batch = PackedVisionCollator(model=model, mask_vision_tokens=True)(features)
    with_images = [f for f in features if "pixel_values" in f]
    assert torch.equal(batch["pixel_values"], torch.cat([f["pixel_values"] for f in with_images]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([f["image_grid_thw"] for f in with_images]))
    n_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_tokens == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    assert (batch["labels"][batch["input_ids"] == model.config.image_token_id] == -100).all()
    assert "attention_mask" not in batch


def test_idefics3_images_concatenated_on_the_image_axis():
    model = model_of("idefics3")
    features = vision_proof_features(model.config)
    batch = PackedVisionCollator(model=model)(features)
    assert batch["pixel_values"].shape[:2] == (1, sum(f["pixel_values"].shape[1] for f in features if "pixel_values" in f))
    assert batch["position_ids"].shape == batch["input_ids"].shape  # 1-D rotary: plain restarting positions


def test_processor_style_batched_tokens_accepted():
    model = model_of("qwen2_vl")
    features = vision_proof_features(model.config, seed=6)
    batched = [{**f, "input_ids": torch.tensor([f["input_ids"]]), "attention_mask": torch.ones(1, len(f["input_ids"]), dtype=torch.long)}
               for f in features]
    collator = PackedVisionCollator(model=model)
    a, b = collator(features), collator(batched)
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_inputs_not_mutated():
    model = model_of("qwen2_vl")
    features = vision_proof_features(model.config, seed=7)
    before = copy.deepcopy(features)
    PackedVisionCollator(model=model)(features)
    for f, g in zip(features, before):
        assert f.keys() == g.keys()
        for key in f:
            assert torch.equal(torch.as_tensor(np.asarray(f[key])), torch.as_tensor(np.asarray(g[key])))


def test_gemma3_bidirectional_blocks_refused_where_not_exact():
    model = gemma3_with_window(8)
    marked = vision_proof_features(model.config, token_type_ids=True)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match=r"key 'token_type_ids': bidirectional image blocks of 4 packed examples.*"
                                         r"attn_implementation='packcollate', got a model on 'eager'"):
        PackedVisionCollator(model=model)(marked)
    assert BLOCK_IDS in PackedVisionCollator(model=model)(marked[:1])  # one example: nothing packed
    with pytest.raises(ValueError, match=r"model_type None.*pass model=.*causal_image_tokens=True"):
        PackedVisionCollator()(marked)
    batch = PackedVisionCollator(causal_image_tokens=True)(marked)
    assert "token_type_ids" not in batch and BLOCK_IDS not in batch
    model.set_attn_implementation("packcollate")
    assert BLOCK_IDS not in PackedVisionCollator(model=model)(vision_proof_features(model.config))  # no marks


def test_overflow_drop_drops_the_examples_images():
    model = model_of("qwen2_vl")
    features = vision_proof_features(model.config, seed=8)
    longest = int(np.argmax([len(f["input_ids"]) for f in features]))
    limit = len(features[longest]["input_ids"]) - 1
    kept = [f for i, f in enumerate(features) if len(f["input_ids"]) <= limit]
    dropped = PackedVisionCollator(model=model, max_seq_length=limit, overflow="drop")(features)
    expected = PackedVisionCollator(model=model)(kept)
    assert dropped.keys() == expected.keys()
    assert all(torch.equal(dropped[k], expected[k]) for k in expected if torch.is_tensor(expected[k]))


def test_errors_name_example_key_expected_and_given():
    model = model_of("qwen2_vl")
    with pytest.raises(ValueError, match="overflow: expected 'drop' or 'error'.*got 'truncate'"):
        PackedVisionCollator(model=model, max_seq_length=8)
    features = vision_proof_features(model.config, seed=9)
    narrow = {**features[2], "pixel_values": features[2]["pixel_values"][:, :5]}
    with pytest.raises(ValueError, match=r"example 2, key 'pixel_values': expected shape"):
        PackedVisionCollator(model=model)([features[0], features[1], narrow])
    wrong_grid = {**features[0], "image_grid_thw": torch.tensor([[1, 2, 2]])}
    with pytest.raises(ValueError, match=r"example 0, key 'pixel_values': expected 4 patch rows for its image_grid_thw"):
        PackedVisionCollator(model=model)([wrong_grid, features[1]])
    with pytest.raises(ValueError, match="example 0, key 'input_ids': expected one example's tokens"):
        PackedVisionCollator(model=model)([{**features[1], "input_ids": torch.ones(2, 3, dtype=torch.long)}])


@settings(max_examples=6, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from([(4, 4), (8, 4), (4, 12), (8, 8)]), max_size=2),
                          st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
       st.integers(0, 2**16))
def test_property_positions_and_vision_counts(plans, seed):
    """Any mix of image counts, sizes and text lengths: per-example positions equal the model's own,
    the text row restarts, and the packed vision inputs match the placeholder tokens."""
    model = model_of("qwen2_vl")
    rng = np.random.default_rng(seed)
    processor = qwen_image_processor(model.config)
    features = [image_example(model.config, rng, sizes, p, a, processor, False) for sizes, p, a in plans]
    batch = PackedVisionCollator(model=model)(features)
    lengths = [len(f["input_ids"]) for f in features]
    starts = np.cumsum([0] + lengths)
    assert torch.equal(batch["cu_seq_lens_q"], torch.tensor(starts, dtype=torch.int32))
    for f, s, e in zip(features, starts[:-1], starts[1:]):
        ids = torch.tensor([f["input_ids"]])
        kwargs = {"image_grid_thw": f["image_grid_thw"]} if "image_grid_thw" in f else {}
        expected, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == 250).long(), **kwargs)
        assert torch.equal(batch["position_ids"][1:, 0, s:e], expected[:, 0])
        assert torch.equal(batch["position_ids"][0, 0, s:e], torch.arange(e - s))
    n_images = sum(len(sizes) for sizes, _, _ in plans)
    assert batch.get("image_grid_thw", torch.zeros(0, 3)).shape[0] == n_images
    if n_images:
        assert int((batch["input_ids"] == 250).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4


# ---------------------------------------------------------------------------------------------
# PaliGemma: positions
# ---------------------------------------------------------------------------------------------


def test_paligemma_positions_are_one_indexed_per_example():
    model = model_of("paligemma")
    features = vision_proof_features(model.config, seed=1)
    positions = PackedVisionCollator(model=model)(features)["position_ids"][0]
    expected = torch.cat([torch.arange(1, len(f["input_ids"]) + 1) for f in features])
    assert torch.equal(positions, expected)
    assert PackedVisionCollator(model=model).position_ids_start == 1
    chosen = PackedVisionCollator(model=model, position_ids_start=3)(features)["position_ids"][0]  # the user's, once
    assert torch.equal(chosen, expected + 2)
    assert PackedVisionCollator(model=model_of("llava")).position_ids_start == 0


# ---------------------------------------------------------------------------------------------
# Mistral 3 (Pixtral tower), LLaVA-NeXT / OneVision: images of other sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mistral3", "llava_next", "llava_onevision"])
def test_images_of_other_sizes_are_zero_padded_to_the_largest(family):
    """Pixtral `(I, C, H, W)` images, LLaVA-NeXT / OneVision `(I, tiles, C, H, W)`: each example's images at
    the start of every axis of the packed tensor, zeros after; `image_sizes` concatenated; inputs unchanged."""
    model = model_of(family)
    features = vision_proof_features(model.config)
    before = copy.deepcopy(features)
    batch = PackedVisionCollator(model=model)(features)
    images = [image for f in features if "pixel_values" in f for image in f["pixel_values"]]
    assert len({f["pixel_values"].shape[1:] for f in features if "pixel_values" in f}) > 1  # padding was needed
    target = [max(sizes) for sizes in zip(*(f["pixel_values"].shape[1:] for f in features if "pixel_values" in f))]
    assert list(batch["pixel_values"].shape) == [len(images), *target]
    assert torch.equal(batch["image_sizes"], torch.cat([f["image_sizes"] for f in features if "image_sizes" in f]))
    for packed, image in zip(batch["pixel_values"], images):
        own = tuple(slice(0, n) for n in image.shape)
        assert torch.equal(packed[own], image)
        assert float(packed.abs().sum()) == pytest.approx(float(image.abs().sum()), rel=1e-6)  # zeros elsewhere
    for f, g in zip(features, before):
        assert all(torch.equal(torch.as_tensor(f[k]), torch.as_tensor(g[k])) for k in f)


@pytest.mark.parametrize("family", ["mistral3", "llava_next", "llava_onevision"])
def test_every_example_with_images_needs_its_image_sizes(family):
    """The model cuts each image back to its `image_sizes`: an example without them (or with the wrong
    number) is named, whether its own images need padding or are the largest (nothing to pad)."""
    model = model_of(family)
    features = [f for f in vision_proof_features(model.config) if "pixel_values" in f]
    for i in range(len(features)):
        unsized = [{k: v for k, v in f.items() if not (j == i and k == "image_sizes")} for j, f in enumerate(features)]
        images = features[i]["pixel_values"].shape[0]
        with pytest.raises(ValueError, match=rf"example {i}, key 'image_sizes': expected each image's \(height, width\), "
                                             rf"shape \({images}, 2\) for 'pixel_values' .* of {family} .*got none"):
            PackedVisionCollator(model=model)(unsized)
    same = {k: v for k, v in features[0].items() if k != "image_sizes"}  # images of one size: nothing to pad
    with pytest.raises(ValueError, match=r"example 1, key 'image_sizes': .*got none"):
        PackedVisionCollator(model=model)([features[0], same])
    short = [dict(f) for f in features]
    short[0]["image_sizes"] = short[0]["image_sizes"][:0]
    with pytest.raises(ValueError, match=r"example 0, key 'image_sizes': .*got shape \(0, 2\)"):
        PackedVisionCollator(model=model)(short)


def test_mistral3_images_of_one_size_are_not_padded():
    model = model_of("mistral3")
    features = [f for f in vision_proof_features(model.config) if "pixel_values" in f][-1:] * 2
    batch = PackedVisionCollator(model=model)(features)
    assert torch.equal(batch["pixel_values"], torch.cat([f["pixel_values"] for f in features]))


# ---------------------------------------------------------------------------------------------
# [17] H2: every example's placeholders against its own images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "gemma3", "idefics3"])
def test_images_of_one_example_never_fill_anothers_placeholders(family):
    """Example 0 has two images' placeholders and one image, example 1 one placeholder block and two images:
    the batch's totals agree, so the joined images used to fill the placeholders in order (example 0 trained
    on example 1's image). Each example alone raises in the model; packed, the collator names example 0."""
    model = model_of(family)
    one, _, two, _ = vision_proof_features(model.config, seed=5)
    swapped = [{**two, "pixel_values": one["pixel_values"]}, {**one, "pixel_values": two["pixel_values"]}]
    with pytest.raises(ValueError, match=r"example 0, key 'input_ids': expected \d+ image placeholder tokens per image "
                                         r"row as in the whole batch .*its images would fill another example's"):
        PackedVisionCollator(model=model)(swapped)
    PackedVisionCollator(model=model)([two, one])  # as given: accepted


def test_qwen2_vl_pixel_rows_of_one_example_never_move_to_another():
    """Qwen2-VL: example 0's patch rows short by 4, example 3's long by 4 (grids and placeholders intact): the
    joined rows used to be read as example 0's image, 4 rows of it from example 3."""
    model = model_of("qwen2_vl")
    features = vision_proof_features(model.config, seed=6)
    first, last = features[0], features[3]
    moved = [{**first, "pixel_values": first["pixel_values"][:-4]}, features[1],
             {**last, "pixel_values": torch.cat([first["pixel_values"][-4:], last["pixel_values"]])}]
    rows = int(first["image_grid_thw"].prod())
    with pytest.raises(ValueError, match=rf"example 0, key 'pixel_values': expected {rows} patch rows for its "
                                         rf"image_grid_thw .*got shape \({rows - 4}, "):
        PackedVisionCollator(model=model)(moved)


def test_qwen2_vl_grids_of_one_example_never_move_to_another():
    """The grids (and rows) of examples 0 and 3 swapped: every example's placeholders disagree with its own grid."""
    model = model_of("qwen2_vl")
    features = vision_proof_features(model.config, seed=7)
    vision = ("pixel_values", "image_grid_thw")
    swapped = [{**features[0], **{k: features[3][k] for k in vision}}, {**features[3], **{k: features[0][k] for k in vision}}]
    with pytest.raises(ValueError, match=r"example 0, key 'input_ids': expected \d+ image placeholder tokens for its "
                                         r"image_grid_thw"):
        PackedVisionCollator(model=model)(swapped)


def test_placeholders_without_images_and_images_without_placeholders_are_named():
    model = model_of("llava_next")
    with_image, text_only = vision_proof_features(model.config, seed=8)[:2]
    lost = {**with_image, "input_ids": text_only["input_ids"]}
    with pytest.raises(ValueError, match="example 1, key 'input_ids': expected image placeholder tokens exactly when "
                                         "the example has images, got 0 placeholders and its images"):
        PackedVisionCollator(model=model)([with_image, lost])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixel_values_are_refused(bad):
    model = model_of("llava")
    features = vision_proof_features(model.config, seed=9)
    pixels = features[2]["pixel_values"].clone()
    pixels[1, 0, 3, 3] = bad
    with pytest.raises(ValueError, match="example 2, key 'pixel_values': expected finite values, got 1 NaN or infinite"):
        PackedVisionCollator(model=model)([features[0], features[1], {**features[2], "pixel_values": pixels}])
