"""PackedVisionCollator: packed image+text batches equal one example at a time on real VLM architectures.

Every family is a tiny random copy built from its config (no downloads); Qwen-family images go through a
locally built `Qwen2VLImageProcessor`. The reference runs each example alone through transformers' eager
attention, with the model computing its own positions (`get_rope_index`), as unpacked training does.
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packcollate.compat.vision import (
    GRAD_TOLERANCE,
    LOGIT_TOLERANCE,
    VISION_FAMILIES,
    image_example,
    compare_vision_packed_unpacked,
    qwen_image_processor,
    tiny_vision_config,
    tiny_vision_model,
    vision_proof_features,
)
from packcollate.layout import BLOCK_IDS
from packcollate.compat.equivalence import max_relative_grad_diff
from packcollate.collate.vision import PACKING_KWARGS, PackedVisionCollator

torch.set_num_threads(1)
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v")
_MODELS: dict = {}


def model_of(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_vision_model(family)
    model = _MODELS[family]
    model.set_attn_implementation("packcollate")
    return model


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


def gemma3_with_window(window: int):
    from transformers import AutoModelForImageTextToText

    config = tiny_vision_config("gemma3")
    config.get_text_config().sliding_window = window
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, attn_implementation="packcollate").float().eval()


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
    with pytest.raises(ValueError, match="example 0: get_rope_index"):
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


def test_check_cli_image_text_to_text(capsys):
    from packcollate.tools.cli import main

    assert main(["check", "--task", "image-text-to-text", "qwen2_vl", "--backend", "packcollate"]) == 0
    out = capsys.readouterr().out
    assert "packcollate use_cache=False exact" in out and "use_cache=True  exact" in out
    with pytest.raises(ValueError, match="expected one of"):
        main(["check", "--task", "image-text-to-text", "llama"])


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
