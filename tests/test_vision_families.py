"""What PaliGemma, the Pixtral-tower families (Mistral 3) and LLaVA-NeXT / OneVision need beyond the generic vision proof.

(`test_multimodal.test_packed_equals_unpacked` proves every family of `VISION_FAMILIES` packed ==
one example at a time; these tests pin down what makes PaliGemma and Mistral 3 exact.)

- PaliGemma is a prefix LM: its processor's `token_type_ids` mark the prefix (image and prompt, 0)
  against the answer (1); the prefix attends both ways, the answer causally. The model builds that
  mask itself from the marks, which stay in the batch. Its text layers are flagged `is_causal=False`
  (`use_bidirectional_attention`) so that sdpa adds no causal flag to it: the packcollate backend sees
  the flag under a mask that is causal somewhere and hands the layers transformers' own mask. PaliGemma 2
  (Gemma 2 text) adds sliding windows, which the prefix escapes: `(window & causal) | prefix`. Its
  positions are 1-indexed.
- Mistral 3's Pixtral tower cuts every image back to its `image_sizes`, LLaVA-NeXT / OneVision keep
  each image's own tiles: images of different sizes (tile counts) in different examples are
  zero-padded to the largest, as their processors pad a batch.
"""

import copy

import pytest
import torch

from packcollate.backend import mask
from packcollate.layout import BLOCK_IDS
from packcollate.compat.vision import (
    GRAD_TOLERANCE,
    LOGIT_TOLERANCE,
    compare_vision_packed_unpacked,
    tiny_vision_config,
    tiny_vision_model,
    vision_proof_features,
)
from packcollate.compat.tiny import tiny_config
from packcollate.collate.vision import PackedVisionCollator

torch.set_num_threads(1)
_MODELS: dict = {}


def model_of(family: str, backend: str = "packcollate"):
    if family not in _MODELS:
        _MODELS[family] = tiny_vision_model(family)
    _MODELS[family].set_attn_implementation(backend)
    return _MODELS[family]


def exact(result) -> bool:
    return result.max_logit_diff < LOGIT_TOLERANCE and result.max_grad_rel_diff < GRAD_TOLERANCE


# --- PaliGemma -------------------------------------------------------------------------------


def paligemma2(window: int = 3, seed: int = 0):
    """A tiny PaliGemma 2: Gemma 2 text (sliding and full layers, softcapping), sliding window `window`."""
    from transformers import AutoModelForImageTextToText

    config = tiny_vision_config("paligemma")
    text = tiny_config("gemma2")
    text.sliding_window, text.use_bidirectional_attention, text.vocab_size = window, True, config.text_config.vocab_size
    config.text_config = text
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, attn_implementation="packcollate").float().eval()


@pytest.mark.parametrize("use_cache", [False, True])
def test_paligemma_prefix_blocks_pack_exactly(use_cache):
    """With the processor's marks: packed == each example alone through eager with its marks; the marks
    travel as `token_type_ids` (the model masks its own prefix), and they matter (causal prefix tokens
    against the same reference are far off)."""
    model = model_of("paligemma")
    marked = vision_proof_features(model.config, token_type_ids=True)
    batch = PackedVisionCollator(model=model)(marked)
    assert BLOCK_IDS not in batch
    assert torch.equal(batch["token_type_ids"][0], torch.cat([torch.tensor(f["token_type_ids"]) for f in marked]))
    assert exact(result := compare_vision_packed_unpacked(model, marked, use_cache=use_cache)), result
    causal = PackedVisionCollator(model=model, causal_image_tokens=True)
    assert compare_vision_packed_unpacked(model, marked, collator=causal).max_logit_diff > 1e-2


def test_paligemma_without_marks_is_causal(monkeypatch):
    """No marks: the backend attends causally like eager, because its mask function sees layers flagged
    bidirectional under a causal mask and hands them transformers' mask; without that they would follow
    `is_causal=False` and let tokens see the future."""
    model = model_of("paligemma")
    features = vision_proof_features(model.config)
    assert exact(result := compare_vision_packed_unpacked(model, features)), result
    monkeypatch.setattr(mask, "flagged_layers_under_causal_mask", lambda *args: False)
    assert compare_vision_packed_unpacked(model, features).max_logit_diff > 1e-2


@pytest.mark.parametrize("marks", [False, True])
def test_paligemma_without_the_collator_matches_eager(marks):
    """A padded batch straight from the examples (no collator, no packing: an eval loop, generation's
    prefill) on the packcollate backend == eager, with and without the prefix marks."""
    model = model_of("paligemma")
    features = [f for f in vision_proof_features(model.config, seed=4, token_type_ids=marks) if "pixel_values" in f][:2]
    width = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]),
        "pixel_values": torch.cat([f["pixel_values"] for f in features]),
    }
    if marks:  # padding is marked as answer (1), as the processor does
        batch["token_type_ids"] = torch.tensor([f["token_type_ids"] + [1] * (width - len(f["input_ids"])) for f in features])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model(**batch).logits
        model.set_attn_implementation("eager")
        try:
            theirs = model(**batch).logits
        finally:
            model.set_attn_implementation("packcollate")
    assert (ours[real] - theirs[real]).abs().max() < LOGIT_TOLERANCE


@pytest.mark.parametrize("marks", [False, True])
@pytest.mark.parametrize("backend", ["packcollate", "eager"])
def test_paligemma2_prefix_escapes_the_sliding_window(marks, backend):
    """PaliGemma 2's sliding layers: `(window & causal) | same prefix` (its forward ORs the prefix in after
    the window). Prefixes longer than the window (3) pack exactly, forward and backward."""
    model = paligemma2()
    model.set_attn_implementation(backend)
    features = vision_proof_features(model.config, token_type_ids=marks)
    if marks:
        assert max(f["token_type_ids"].count(0) for f in features) > 3 * model.config.text_config.sliding_window
    assert exact(result := compare_vision_packed_unpacked(model, features)), result


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


def test_paligemma_lora_wrapped_packs_prefix_blocks_exactly():
    peft = pytest.importorskip("peft")
    base = tiny_vision_model("paligemma", seed=2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    marked = vision_proof_features(base.config, seed=2, token_type_ids=True)
    assert exact(result := compare_vision_packed_unpacked(model, marked, collator=PackedVisionCollator(model=model))), result


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_paligemma_prefix_blocks_pack_exactly_on_transformers_backends(backend):
    """transformers' own packed mask keeps PaliGemma's prefix blocks per sequence (one block per prefix,
    found by the packed-sequence mask): the collator does not refuse them there, and they are exact."""
    model = model_of("paligemma", backend)
    try:
        marked = vision_proof_features(model.config, seed=3, token_type_ids=True)
        assert exact(result := compare_vision_packed_unpacked(model, marked)), result
    finally:
        model.set_attn_implementation("packcollate")


# --- Mistral 3 (Pixtral tower) -----------------------------------------------------------------


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
