"""Image-text-to-text models: tiny copies, proof examples with images, and the packed-vs-unpacked proof.

`tiny_vision_model("qwen2_vl")` builds a tiny random copy of the family (text side from `tiny_config`,
vision tower shrunk here), `vision_proof_features` makes examples with images of mixed sizes, uneven
text and one text-only example, and `compare_vision_packed_unpacked` compares one packed forward +
backward (`PackedVisionCollator`, the `packcollate` backend) against every example on its own through
transformers' reference attention (`eager`), with the model computing its own positions
(`get_rope_index` for multi-section rotary families) exactly as an unpacked training step would.
`LOGIT_TOLERANCE` and `GRAD_TOLERANCE` (from `report`) are re-exported: what the proof is judged by. The
matrix of every family and backend (`packcollate check --task image-text-to-text`) is
`packcollate.tools.vision_matrix`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..backend import prepare
from ..collate.vision import PackedVisionCollator
from ..layout import IGNORE_INDEX
from .equivalence import (
    Equivalence,
    gradients,
    max_relative_grad_diff,
    summed_token_loss,
    switched_backend,
)
from .report import GRAD_TOLERANCE as GRAD_TOLERANCE
from .report import LOGIT_TOLERANCE as LOGIT_TOLERANCE
from .tiny import seeded, tiny_config

#: Families with a tiny copy here, the task they serve (`packcollate check --task image-text-to-text`).
VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe",
                   "glm46v", "glm_ocr", "gemma3",
                   "paligemma", "llava", "llava_next", "llava_onevision", "vipllava", "mistral3", "aya_vision", "cohere2_vision", "internvl", "idefics2",
                   "idefics3", "smolvlm")
TASK = "image-text-to-text"
#: Token ids of the tiny copies (inside the tiny 256-token vocabulary).
IMAGE_TOKEN, VIDEO_TOKEN, START_TOKEN, END_TOKEN = 250, 251, 252, 253
TEXT_TOKENS = (3, 240)  # ordinary tokens are drawn from [3, 240)
#: Tiny image sides (pixels) for the proof; a patch is 2 px (Qwen) or 8 px (the others).
PATCH_QWEN, PATCH_OTHER, IMAGE_SIDE_OTHER = 2, 8, 32

_QWEN_TOWER = dict(depth=2, num_heads=4, in_channels=3, patch_size=PATCH_QWEN, spatial_merge_size=2,
                   temporal_patch_size=2)
_VISION_OVERRIDES = {
    "qwen2_vl": dict(_QWEN_TOWER, embed_dim=32, hidden_size=64, mlp_ratio=2),
    # window_size 8 px = 2x2 merged tokens per window, and one full-attention block: both paths run
    "qwen2_5_vl": dict(_QWEN_TOWER, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=8,
                       fullatt_block_indexes=[1]),
    "qwen3_vl": dict(_QWEN_TOWER, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                     num_position_embeddings=64, deepstack_visual_indexes=[0]),
    "glm4v": dict(_QWEN_TOWER, hidden_size=32, intermediate_size=64, out_hidden_size=64, image_size=16),
}
_VISION_OVERRIDES["qwen3_vl_moe"] = _VISION_OVERRIDES["qwen3_vl"]
# GLM-4.5V (MoE text, partial rotary), GLM-4.6V, GLM-OCR: the GLM-4V tower
_VISION_OVERRIDES["glm4v_moe"] = _VISION_OVERRIDES["glm46v"] = _VISION_OVERRIDES["glm_ocr"] = _VISION_OVERRIDES["glm4v"]
# Qwen3.5: the Qwen3-VL tower without deepstack, a hybrid text side (Gated DeltaNet + attention layers)
_VISION_OVERRIDES["qwen3_5"] = _VISION_OVERRIDES["qwen3_5_moe"] = dict(
    _QWEN_TOWER, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=64)
# head_dim 16: 8 rotary pairs
_MROPE_SECTIONS = {"qwen2_vl": [2, 3, 3], "qwen2_5_vl": [2, 3, 3], "qwen3_vl": [4, 2, 2], "qwen3_vl_moe": [4, 2, 2],
                   "qwen3_5": [4, 2, 2], "qwen3_5_moe": [4, 2, 2],
                   "glm4v": [2, 3, 3], "glm46v": [2, 3, 3], "glm_ocr": [2, 3, 3],
                   "glm4v_moe": [2, 1, 1]}  # partial rotary 0.5: 4 rotary pairs
_SIGLIP_TOWER = dict(image_size=IMAGE_SIDE_OTHER, patch_size=PATCH_OTHER, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4)
#: LLaVA-NeXT's tiles (any-resolution): a base tile plus a grid of 32-px tiles, one pinpoint per grid.
LLAVA_NEXT_PINPOINTS = [[IMAGE_SIDE_OTHER, IMAGE_SIDE_OTHER], [IMAGE_SIDE_OTHER, 2 * IMAGE_SIDE_OTHER],
                        [2 * IMAGE_SIDE_OTHER, IMAGE_SIDE_OTHER]]
#: Pixtral-tower families (Mistral 3): images keep their own sizes (multiples of 16 px: 8 px patches,
#: 2x2 merged), up to this side; the proof's sizes are scaled by `PIXTRAL_SCALE`.
PIXTRAL_MAX_SIDE, PIXTRAL_SCALE = 64, 4


def tiny_vision_config(model_type: str):
    """A tiny random-weight config of an image-text-to-text family (see `VISION_FAMILIES`)."""
    if model_type not in VISION_FAMILIES:
        raise ValueError(f"model_type: expected one of {VISION_FAMILIES}, got {model_type!r}")
    config = tiny_config(model_type)
    vision = config.vision_config
    text = config.get_text_config()
    if model_type in _VISION_OVERRIDES:
        for key, value in _VISION_OVERRIDES[model_type].items():
            setattr(vision, key, value)
        text.rope_parameters = {**text.rope_parameters, "mrope_section": _MROPE_SECTIONS[model_type]}
        config.image_token_id, config.video_token_id = IMAGE_TOKEN, VIDEO_TOKEN
        config.vision_start_token_id, config.vision_end_token_id = START_TOKEN, END_TOKEN
        config.image_start_token_id, config.image_end_token_id = START_TOKEN, END_TOKEN  # GLM-4V's names
    else:
        for key, value in _SIGLIP_TOWER.items():
            setattr(vision, key, [value, value] if isinstance(getattr(vision, key, None), list) else value)
    if model_type == "gemma3":
        config.mm_tokens_per_image = 4  # 4x4 patches pooled to 2x2
        config.image_token_index, config.boi_token_index, config.eoi_token_index = IMAGE_TOKEN, START_TOKEN, END_TOKEN
    elif model_type == "llava":
        config.image_token_index = IMAGE_TOKEN
        config.image_seq_length = (IMAGE_SIDE_OTHER // PATCH_OTHER) ** 2
        vision.projection_dim = 32
    elif model_type in ("idefics2", "idefics3", "smolvlm", "aya_vision", "cohere2_vision"):
        config.image_token_id = IMAGE_TOKEN
        if model_type == "idefics2":
            config.perceiver_config.resampler_n_latents = 4  # the resampler's tokens per image
    elif model_type in ("llava_next", "llava_onevision"):
        config.image_token_index = IMAGE_TOKEN
        config.image_grid_pinpoints = LLAVA_NEXT_PINPOINTS
    elif model_type == "vipllava":
        config.image_token_index = IMAGE_TOKEN
        config.vision_feature_layers = [-3, -2, -1]  # every hidden state of the 2-layer tower
    elif model_type == "paligemma":
        config.image_token_id = IMAGE_TOKEN
        vision.projection_dim = config.get_text_config().hidden_size
    elif model_type == "mistral3":
        config.image_token_id = IMAGE_TOKEN
        vision.image_size, vision.head_dim = PIXTRAL_MAX_SIDE, vision.hidden_size // vision.num_attention_heads
    elif model_type == "internvl":
        config.image_token_id = IMAGE_TOKEN
        config.image_seq_length = int(IMAGE_SIDE_OTHER // PATCH_OTHER * config.downsample_ratio) ** 2
    return config


def tiny_vision_model(model_type: str, attn_implementation: str = "packcollate", seed: int = 0):
    """A tiny random `AutoModelForImageTextToText` of the family, fp32, eval mode (no dropout), prepared
    (`packcollate.prepare`), built from `seed` without touching the caller's random stream."""
    from transformers import AutoModelForImageTextToText

    with seeded(seed):
        model = AutoModelForImageTextToText.from_config(tiny_vision_config(model_type),
                                                        attn_implementation=attn_implementation)
    return prepare(model.float().eval())


def image_tokens(config, grid_thw: torch.Tensor | None = None, size: tuple[int, int] | None = None) -> int:
    """Placeholder tokens one image takes in the text (`grid_thw` `(3,)` for grid families, the image's
    `size` (height, width) in pixels for Pixtral-tower families and LLaVA-NeXT)."""
    model_type = config.model_type
    vision = config.vision_config
    if model_type in _VISION_OVERRIDES:
        return int(grid_thw.prod()) // vision.spatial_merge_size ** 2
    if model_type == "gemma3":
        return config.mm_tokens_per_image
    if model_type in ("llava", "internvl"):
        return config.image_seq_length
    if model_type == "mistral3":
        unit = vision.patch_size * config.spatial_merge_size
        return (size[0] // unit) * (size[1] // unit)
    side = IMAGE_SIDE_OTHER // PATCH_OTHER  # patches per side of the fixed-size families
    if model_type in ("llava_next", "llava_onevision"):
        # an image of a pinpoint's size: the base tile, then each row of the grid and a newline; OneVision
        # gives an image of a several-image example its base tile only, and one newline (`size` None)
        if size is None:
            return side * side + 1
        rows, columns = size[0] // IMAGE_SIDE_OTHER * side, size[1] // IMAGE_SIDE_OTHER * side
        return side * side + rows * (columns + 1)
    if model_type in ("aya_vision", "cohere2_vision"):
        return (side // config.downsample_factor) ** 2
    if model_type in ("idefics3", "smolvlm"):
        return side * side // config.scale_factor ** 2
    if model_type == "idefics2":
        return config.perceiver_config.resampler_n_latents
    return side * side  # vipllava, paligemma


def qwen_image_processor(config):
    """Qwen2-VL's image processor, built locally for the tiny tower (2-px patches); its PIL variant
    when torchvision is not installed (what transformers falls back to anyway, without the warning)."""
    import importlib.util

    import transformers

    name = "Qwen2VLImageProcessor" if importlib.util.find_spec("torchvision") else "Qwen2VLImageProcessorPil"
    Qwen2VLImageProcessor = getattr(transformers, name, None) or transformers.Qwen2VLImageProcessor

    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    return Qwen2VLImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                 temporal_patch_size=vision.temporal_patch_size, min_pixels=unit * unit,
                                 max_pixels=(8 * unit) ** 2)


def image_example(config, rng, sizes: Sequence[tuple[int, int]], prompt: int, answer: int, processor,
                   token_type_ids: bool) -> dict:
    """One example: `prompt` text tokens, its images (placeholders between start/end tokens), `answer` tokens."""
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    ids = list(rng.integers(*TEXT_TOKENS, prompt))
    example: dict = {}
    pixels, grids, image_sizes = [], [], []
    for height, width in sizes:
        if processor is not None:
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            out = processor(images=[image], return_tensors="pt")
            pixels.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
            n = image_tokens(config, out["image_grid_thw"][0])
        elif config.model_type == "mistral3":
            size = (height * PIXTRAL_SCALE, width * PIXTRAL_SCALE)
            pixels.append(torch.from_numpy(rng.standard_normal((3, *size)).astype(np.float32)))
            image_sizes.append(size)
            n = image_tokens(config, size=size)
        elif config.model_type in ("llava_next", "llava_onevision"):
            # the pinpoint of the image's orientation; base tile + grid tiles
            size = (IMAGE_SIDE_OTHER * (1 + (height > width)), IMAGE_SIDE_OTHER * (1 + (width > height)))
            tiles = 1 + (size[0] // IMAGE_SIDE_OTHER) * (size[1] // IMAGE_SIDE_OTHER)
            side = IMAGE_SIDE_OTHER
            pixels.append(torch.from_numpy(rng.standard_normal((tiles, 3, side, side)).astype(np.float32)))
            image_sizes.append(size)
            several = config.model_type == "llava_onevision" and len(sizes) > 1
            n = image_tokens(config, size=None if several else size)
        else:
            side = IMAGE_SIDE_OTHER
            pixels.append(torch.from_numpy(rng.standard_normal((1, 3, side, side)).astype(np.float32)))
            n = image_tokens(config)
        ids += [START_TOKEN] + [image_token] * n + [END_TOKEN]
    prefix = len(ids)
    ids += list(rng.integers(*TEXT_TOKENS, answer))
    example["input_ids"] = [int(t) for t in ids]
    if image_sizes:  # the images of one example padded to its largest, as the processor pads a batch
        target = [max(sizes) for sizes in zip(*(p.shape for p in pixels))]
        example["pixel_values"] = torch.stack([
            torch.nn.functional.pad(p, [a for n, t in zip(reversed(p.shape), reversed(target)) for a in (0, t - n)])
            for p in pixels])
        example["image_sizes"] = torch.tensor(image_sizes)
        if config.model_type == "llava_onevision":
            example["batch_num_images"] = torch.tensor([len(image_sizes)])
    elif pixels:
        example["pixel_values"] = torch.cat(pixels)
        if grids:
            example["image_grid_thw"] = torch.cat(grids)
        elif config.model_type in ("idefics2", "idefics3", "smolvlm"):
            example["pixel_values"] = example["pixel_values"][None]  # (1, I, C, H, W), as the processor gives
    if config.model_type == "gemma3" and token_type_ids:
        example["token_type_ids"] = [int(t == image_token) for t in example["input_ids"]]
    elif config.model_type == "paligemma" and token_type_ids:  # 0: the prefix (prompt and images), 1: the answer
        example["token_type_ids"] = [0] * prefix + [1] * answer
    return example


def vision_proof_features(config, seed: int = 0, token_type_ids: bool = False) -> list[dict]:
    """Four examples: one image, none (text only), two images of different sizes, one image; uneven text.

    `token_type_ids`: give Gemma 3 examples the processor's image-token marks (bidirectional image blocks),
    PaliGemma examples its prefix marks (0 on prompt and images, 1 on the answer)."""
    rng = np.random.default_rng(seed)
    processor = qwen_image_processor(config) if config.model_type in _VISION_OVERRIDES else None
    plans = [([(8, 12)], 3, 6), ([], 5, 9), ([(16, 8), (8, 8)], 2, 4), ([(12, 12)], 7, 2)]
    return [image_example(config, rng, sizes, prompt, answer, processor, token_type_ids)
            for sizes, prompt, answer in plans]


def _unpacked_inputs(example: Mapping, collator: PackedVisionCollator) -> dict:
    """One example as a plain unpadded batch of one, without positions: the model computes its own."""
    ids = torch.tensor([example["input_ids"]])
    inputs = {"input_ids": ids}
    for key, value in example.items():
        if key in collator.vision_keys:
            inputs[key] = value
        elif key in ("token_type_ids", "mm_token_type_ids"):
            inputs[key] = torch.tensor([value])
    if "image_grid_thw" in example or "video_grid_thw" in example:
        inputs.setdefault("mm_token_type_ids", collator.token_modalities(ids[0], example)[None])
    return inputs


def compare_vision_packed_unpacked(
    model, features: Sequence[Mapping], collator: PackedVisionCollator | None = None,
    reference_attn_implementation: str | None = "eager", use_cache: bool = False,
) -> Equivalence:
    """One packed forward + backward against each example alone (through `reference_attn_implementation`).

    The loss of both is the summed next-token cross-entropy over the collator's labels divided by the
    batch's label tokens (what `Trainer` does with `num_items_in_batch`); logits are compared on every
    token, gradients parameter by parameter (`Equivalence`). `use_cache` applies to the packed run (the
    reference, one example alone, is the same either way). Gradients are left zeroed.
    """
    collator = collator or PackedVisionCollator(model=model)
    batch = collator(features)
    labels = batch.pop("labels")
    n_targets = max(int((labels[0, 1:] != IGNORE_INDEX).sum()), 1)
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=use_cache)
    loss = summed_token_loss(out.logits, labels) / n_targets
    loss.backward()
    packed_logits, packed_grads = out.logits[0].detach(), gradients(model)
    model.zero_grad(set_to_none=True)
    pieces, reference_loss = [], 0.0
    with switched_backend(model, reference_attn_implementation):
        for example in features:
            example_labels = collator([example])["labels"]
            ref = model(**_unpacked_inputs(example, collator), use_cache=False)
            example_loss = summed_token_loss(ref.logits, example_labels) / n_targets
            example_loss.backward()
            reference_loss += float(example_loss.detach())
            pieces.append(ref.logits[0].detach())
    reference_grads = gradients(model)
    model.zero_grad(set_to_none=True)
    grad_diff, worst = max_relative_grad_diff(packed_grads, reference_grads)
    return Equivalence(
        max_logit_diff=float((packed_logits - torch.cat(pieces)).abs().max()),
        loss=float(loss.detach()),
        reference_loss=reference_loss,
        max_grad_rel_diff=grad_diff,
        worst_parameter=worst,
    )
