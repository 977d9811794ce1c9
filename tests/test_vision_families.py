"""What PaliGemma, the Pixtral-tower families (Mistral 3) and LLaVA-NeXT / OneVision need beyond the generic vision proof.

(`test_multimodal.test_packed_equals_unpacked` proves every family of `VISION_FAMILIES` packed ==
one example at a time; these tests pin down what makes PaliGemma and Mistral 3 exact.)

- PaliGemma is a prefix LM: its processor's `token_type_ids` mark the prefix (image and prompt, 0)
  against the answer (1); the prefix attends both ways, the answer causally. Its text layers are
  flagged `is_causal=False` (`use_bidirectional_attention`) so that sdpa adds no causal flag to the
  model's own prefix mask: the collator always gives the packcollate backend block ids (all -1
  without marks), which it reads as "causal outside the blocks". Its positions are 1-indexed.
- Mistral 3's Pixtral tower cuts every image back to its `image_sizes`, LLaVA-NeXT / OneVision keep
  each image's own tiles: images of different sizes (tile counts) in different examples are
  zero-padded to the largest, as their processors pad a batch.
"""

import copy

import pytest
import torch

from packcollate.attention import BLOCK_IDS
from packcollate.compat.vision import (
    GRAD_TOLERANCE,
    LOGIT_TOLERANCE,
    compare_vision_packed_unpacked,
    tiny_vision_model,
    vision_proof_features,
)
from packcollate.multimodal import PackedVisionCollator

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


@pytest.mark.parametrize("use_cache", [False, True])
def test_paligemma_prefix_blocks_pack_exactly(use_cache):
    """With the processor's marks: packed == each example alone through eager with its marks; the
    blocks matter (causal prefix tokens against the same reference are far off)."""
    model = model_of("paligemma")
    marked = vision_proof_features(model.config, token_type_ids=True)
    batch = PackedVisionCollator(model=model)(marked)
    marks = torch.cat([torch.tensor(f["token_type_ids"]) for f in marked])
    assert torch.equal(batch[BLOCK_IDS][0], torch.where(marks == 0, 0, -1))
    assert exact(result := compare_vision_packed_unpacked(model, marked, use_cache=use_cache)), result
    causal = PackedVisionCollator(model=model, causal_image_tokens=True)
    assert compare_vision_packed_unpacked(model, marked, collator=causal).max_logit_diff > 1e-2


def test_paligemma_without_marks_is_causal():
    """No marks: the batch still carries block ids (all -1), so the backend attends causally like eager;
    without them it would follow the layers' `is_causal=False` and let tokens see the future."""
    model = model_of("paligemma")
    features = vision_proof_features(model.config)
    batch = PackedVisionCollator(model=model)(features)
    assert (batch[BLOCK_IDS] == -1).all()
    assert exact(result := compare_vision_packed_unpacked(model, features)), result

    class Unblocked(PackedVisionCollator):
        def __call__(self, features, return_tensors=None):
            return {k: v for k, v in super().__call__(features, return_tensors).items() if k != BLOCK_IDS}

    assert compare_vision_packed_unpacked(model, features, collator=Unblocked(model=model)).max_logit_diff > 1e-2


def test_paligemma_positions_are_one_indexed_per_example():
    model = model_of("paligemma")
    features = vision_proof_features(model.config, seed=1)
    positions = PackedVisionCollator(model=model)(features)["position_ids"][0]
    expected = torch.cat([torch.arange(1, len(f["input_ids"]) + 1) for f in features])
    assert torch.equal(positions, expected)


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


def test_mistral3_padding_needs_image_sizes():
    model = model_of("mistral3")
    features = vision_proof_features(model.config)
    unsized = {k: v for k, v in features[0].items() if k != "image_sizes"}
    with pytest.raises(ValueError, match=r"example 0, key 'image_sizes': expected each image's \(height, width\).*"
                                         r"must be padded to \(…, 3, \d+, \d+\) for mistral3, got none"):
        PackedVisionCollator(model=model)([unsized, features[2]])


def test_mistral3_images_of_one_size_are_not_padded():
    model = model_of("mistral3")
    features = [f for f in vision_proof_features(model.config) if "pixel_values" in f][-1:] * 2
    batch = PackedVisionCollator(model=model)(features)
    assert torch.equal(batch["pixel_values"], torch.cat([f["pixel_values"] for f in features]))
