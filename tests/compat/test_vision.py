"""The vision-language proof (`packcollate.compat.vision`): packed image+text batches equal one example at a time
on real VLM architectures.

Every family is a tiny random copy built from its config (no downloads); Qwen-family images go through a
locally built `Qwen2VLImageProcessor`. The reference runs each example alone through transformers' eager
attention, with the model computing its own positions (`get_rope_index`), as unpacked training does: on the
packcollate backend and on transformers' sdpa / eager, with a cache, LoRA-wrapped, with videos, with Gemma 3's
bidirectional image blocks, under `torch.compile`.

What PaliGemma needs beyond the generic proof: PaliGemma is a prefix LM: its processor's `token_type_ids`
mark the prefix (image and prompt, 0) against the answer (1); the prefix attends both ways, the answer
causally. The model builds that mask itself from the marks, which stay in the batch. Its text layers are
flagged `is_causal=False` (`use_bidirectional_attention`) so that sdpa adds no causal flag to it: the
packcollate backend sees the flag under a mask that is causal somewhere and hands the layers transformers'
own mask. PaliGemma 2 (Gemma 2 text) adds sliding windows, which the prefix escapes: `(window & causal) | prefix`.
What the collator emits (positions, images, refusals): collate/test_vision.py.
"""

import copy

import numpy as np
import pytest
import torch

from packcollate.backend import mask
from packcollate.collate.vision import (
    PackedVisionCollator,
    transformers_keeps_blocks_apart,
)
from packcollate.compat.equivalence import max_relative_grad_diff
from packcollate.compat.tiny import tiny_config
from packcollate.compat.vision import (
    GRAD_TOLERANCE,
    LOGIT_TOLERANCE,
    VISION_FAMILIES,
    compare_vision_packed_unpacked,
    tiny_vision_config,
    tiny_vision_model,
    vision_proof_features,
)
from packcollate.errors import UnsupportedError
from packcollate.layout import BLOCK_IDS
from tests.helpers import gemma3_with_window
from tests.helpers import vision_model as model_of

torch.set_num_threads(1)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_packed_equals_unpacked(family):
    model = model_of(family)
    features = vision_proof_features(model.config)
    assert any("pixel_values" not in f for f in features) and len({len(f["input_ids"]) for f in features}) > 1
    result = compare_vision_packed_unpacked(model, features)
    assert result.max_logit_diff < LOGIT_TOLERANCE, result
    assert result.max_grad_rel_diff < GRAD_TOLERANCE, result
    assert abs(result.loss - result.reference_loss) < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_transformers_backends_read_the_text_row(backend):
    """sdpa / eager keep examples apart from row 0 of the (4, 1, N) positions (no cache)."""
    model = model_of("qwen2_vl")
    model.set_attn_implementation(backend)
    result = compare_vision_packed_unpacked(model, vision_proof_features(model.config, seed=1))
    assert result.max_logit_diff < LOGIT_TOLERANCE and result.max_grad_rel_diff < GRAD_TOLERANCE


def test_packcollate_backend_exact_with_a_cache():
    """use_cache=True (the config default outside Trainer) still keeps examples apart under our backend."""
    model = model_of("qwen2_5_vl")
    features = vision_proof_features(model.config, seed=2)
    collator = PackedVisionCollator(model=model)
    with torch.no_grad():
        packed = model(**{k: v for k, v in collator(features).items() if k != "labels"}, use_cache=True).logits[0]
        alone = [model(**{k: v for k, v in collator([f]).items() if k != "labels"}, use_cache=True).logits[0]
                 for f in features]
    assert (packed - torch.cat(alone)).abs().max() < LOGIT_TOLERANCE


@pytest.mark.parametrize("window", [8, 2])
@pytest.mark.parametrize("use_cache", [False, True])
def test_gemma3_bidirectional_image_blocks_pack_exactly(window, use_cache):
    """Gemma 3 with its processor's token_type_ids: image tokens see each other in both directions. Packed
    (the family's block ids, the packcollate backend) == each example alone through eager with its marks,
    also with a sliding window shorter than an image block (window 2 < 4 image tokens)."""
    model = gemma3_with_window(window)
    marked = vision_proof_features(model.config, token_type_ids=True)
    batch = PackedVisionCollator(model=model)(marked)
    ids, blocks = batch["input_ids"][0], batch[BLOCK_IDS][0]
    assert torch.equal(blocks >= 0, ids == model.config.image_token_index)
    assert len(set(blocks[blocks >= 0].tolist())) == sum(len(f.get("pixel_values", [])) for f in marked)
    result = compare_vision_packed_unpacked(model, marked, use_cache=use_cache)
    assert result.max_logit_diff < LOGIT_TOLERANCE and result.max_grad_rel_diff < GRAD_TOLERANCE, result
    # the blocks matter: causal image tokens against the same marked reference are far off
    causal = compare_vision_packed_unpacked(model, marked, collator=PackedVisionCollator(model=model,
                                                                                        causal_image_tokens=True))
    assert causal.max_logit_diff > 1e-2


def test_gemma3_lora_wrapped_packs_bidirectional_blocks_exactly():
    peft = pytest.importorskip("peft")
    base = gemma3_with_window(8)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    marked = vision_proof_features(base.config, seed=3, token_type_ids=True)
    result = compare_vision_packed_unpacked(model, marked, collator=PackedVisionCollator(model=model))
    assert result.max_logit_diff < LOGIT_TOLERANCE and result.max_grad_rel_diff < GRAD_TOLERANCE, result


def test_lora_wrapped_model_packs_exactly():
    """A PEFT/LoRA-wrapped VLM: the collator finds get_rope_index through the wrapper; packed == unpacked."""
    peft = pytest.importorskip("peft")
    base = tiny_vision_model("qwen2_5_vl", seed=1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv"], lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    collator = PackedVisionCollator(model=model)
    assert collator.rope_owner is base.model
    result = compare_vision_packed_unpacked(model, vision_proof_features(base.config, seed=10), collator=collator)
    assert result.max_logit_diff < LOGIT_TOLERANCE and result.max_grad_rel_diff < GRAD_TOLERANCE, result
    assert any("lora" in name for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_video_examples_pack_exactly(family):
    """Videos (fed as tensors: transformers' video processors need torchvision) next to images and text."""
    from packcollate.compat.vision import END_TOKEN, START_TOKEN, VIDEO_TOKEN

    model = model_of(family)
    rng = np.random.default_rng(11)
    vision = model.config.vision_config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    features = vision_proof_features(model.config, seed=11)[:2]
    for grid in ([2, 4, 6], [1, 4, 4]):
        n = int(np.prod(grid))
        ids = [5, 6] + [START_TOKEN] + [VIDEO_TOKEN] * (n // 4) + [END_TOKEN] + rng.integers(3, 240, 5).tolist()
        video = {"input_ids": ids, "pixel_values_videos": torch.from_numpy(rng.standard_normal((n, patch)).astype("float32")),
                 "video_grid_thw": torch.tensor([grid])}
        if family == "qwen2_5_vl":
            video["second_per_grid_ts"] = torch.tensor([0.5])
        features.append(video)
    collator = PackedVisionCollator(model=model)
    batch = collator(features)
    assert batch["video_grid_thw"].shape == (2, 3) and batch["pixel_values_videos"].shape[0] == 48 + 16
    result = compare_vision_packed_unpacked(model, features, collator=collator)
    assert result.max_logit_diff < LOGIT_TOLERANCE and result.max_grad_rel_diff < GRAD_TOLERANCE, result


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_compiled_model_with_bidirectional_blocks_equals_eager(family):
    """torch.compile'd (dynamic shapes, batches of different lengths, with and without the processor's marks):
    the traced backend path applies the blocks as the eager path does (which equals one example at a time,
    above and in test_vision_families), PaliGemma's layers flagged non-causal included."""
    model = gemma3_with_window(2) if family == "gemma3" else tiny_vision_model(family, "packcollate")
    collator = PackedVisionCollator(model=model)
    compiled = torch.compile(copy.deepcopy(model), backend="eager", dynamic=True)
    for seed, marks in ((0, True), (5, True), (6, False)):
        batch = collator(vision_proof_features(model.config, seed=seed, token_type_ids=marks))
        out, reference = compiled(**batch), model(**batch)
        assert float((out.logits - reference.logits).abs().max()) < 1e-5
        out.loss.backward()
        reference.loss.backward()
        # the proof's measure: a key bias's gradient is 0 up to rounding, so relative to the largest gradient
        diff, worst = max_relative_grad_diff({n: p.grad for n, p in model.named_parameters()},
                                         {n: p.grad for n, p in compiled._orig_mod.named_parameters()})
        assert diff < 1e-5, (worst, diff)
        compiled.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# PaliGemma
# ---------------------------------------------------------------------------------------------


def exact(result) -> bool:
    return result.max_logit_diff < LOGIT_TOLERANCE and result.max_grad_rel_diff < GRAD_TOLERANCE


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
    the window). Prefixes longer than the window (3) pack exactly, forward and backward; where this
    transformers' own mask lets the prefix blocks reach across packed sequences (5.17), the collator refuses
    marked batches for a model on transformers' backends (read at run time)."""
    model = paligemma2()
    model.set_attn_implementation(backend)
    features = vision_proof_features(model.config, token_type_ids=marks)
    if marks:
        assert max(f["token_type_ids"].count(0) for f in features) > 3 * model.config.text_config.sliding_window
    if marks and backend != "packcollate" and not transformers_keeps_blocks_apart():
        with pytest.raises(UnsupportedError, match="block overlay reaches across packed sequences"):
            compare_vision_packed_unpacked(model, features)
        return
    assert exact(result := compare_vision_packed_unpacked(model, features)), result


def test_paligemma_lora_wrapped_packs_prefix_blocks_exactly():
    peft = pytest.importorskip("peft")
    base = tiny_vision_model("paligemma", seed=2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    marked = vision_proof_features(base.config, seed=2, token_type_ids=True)
    assert exact(result := compare_vision_packed_unpacked(model, marked, collator=PackedVisionCollator(model=model))), result


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_paligemma_prefix_blocks_pack_exactly_on_transformers_backends(backend):
    """Where transformers' own packed mask keeps PaliGemma's prefix blocks per sequence (one block per prefix,
    found by the packed-sequence mask: 5.24), the collator does not refuse them there, and they are exact;
    where its block overlay reaches across packed sequences (5.17), it refuses them (read at run time)."""
    model = model_of("paligemma", backend)
    try:
        marked = vision_proof_features(model.config, seed=3, token_type_ids=True)
        if not transformers_keeps_blocks_apart():
            with pytest.raises(UnsupportedError, match="block overlay reaches across packed sequences"):
                compare_vision_packed_unpacked(model, marked)
            return
        assert exact(result := compare_vision_packed_unpacked(model, marked)), result
    finally:
        model.set_attn_implementation("packcollate")
