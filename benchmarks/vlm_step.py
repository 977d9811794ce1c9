"""One training step (forward + backward + AdamW) of a tiny Qwen2-VL-shaped model, padded vs packed.

    python benchmarks/vlm_step.py                  # CPU, fp32
    python benchmarks/vlm_step.py --device cuda --dtype bf16 --preset 2b   # a Qwen2-VL-2B-shaped config

Modes, on the same batches in the same order, all on the same initial weights:
- `padded-sdpa`: right-padded text with `attention_mask` (what TRL's vision collator gives), the
  model computing its own rotary positions (`get_rope_index` over the padded rows), sdpa;
- `packed-sdpa`: `PackedVisionCollator` (one row, `(4, 1, N)` positions), transformers' sdpa detecting
  the packing from the text row of the positions (`use_cache=False`; it builds an N x N mask);
- `packcollate`: `PackedVisionCollator` + the `packcollate` attention backend.

Data: batches of 8 chats with 0-2 images each, sides drawn from 56-224 px (so 4-64 image tokens per
image after the 2x2 merge of 14-px patches), text lognormal with median 60 tokens and sigma 0.8. Images go
through a locally built `Qwen2VLImageProcessor`. The vision tower runs on the same images in every mode
(padding changes only the text); the table shows real (non-pad) text+image tokens/s, the median step, the
speed-up over padded, and the ideal speed-up of the language model (padded tokens / real tokens).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import _common as common
import numpy as np
import torch

import packcollate
from packcollate import PackedVisionCollator, PaddedCollator
from packcollate.backend import describe, use_backend
from packcollate.tools.bench import library_versions, save_result

MEDIAN_TEXT, SIGMA, MAX_TEXT = 60, 0.8, 512
IMAGE_SIDES = (56, 84, 112, 168, 224)
IMAGE_TOKEN, VIDEO_TOKEN, START_TOKEN, END_TOKEN = 4090, 4091, 4092, 4093
PRESETS = {
    # text: layers, hidden, heads, kv heads, intermediate, vocab; vision: depth, width, heads
    "tiny": dict(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=1024, vocab=4096,
                 vision_depth=4, vision_width=128, vision_heads=4),
    "2b": dict(layers=28, hidden=1536, heads=12, kv_heads=2, intermediate=8960, vocab=151936,
               vision_depth=32, vision_width=1280, vision_heads=16),
}


def build_model(preset: dict, dtype, device):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    head_dim = preset["hidden"] // preset["heads"]
    quarter = head_dim // 16  # mrope sections in the 2:3:3 ratio of the rotary half (16, 24, 24 at head_dim 128)
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=preset["hidden"], intermediate_size=preset["intermediate"],
                         num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
                         num_key_value_heads=preset["kv_heads"], vocab_size=preset["vocab"],
                         max_position_embeddings=4096, use_cache=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]}),
        vision_config=dict(depth=preset["vision_depth"], embed_dim=preset["vision_width"], hidden_size=preset["hidden"],
                           num_heads=preset["vision_heads"], mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=START_TOKEN,
        vision_end_token_id=END_TOKEN,
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).to(device=device, dtype=dtype)


def image_processor():
    import importlib.util

    import transformers

    name = "Qwen2VLImageProcessor" if importlib.util.find_spec("torchvision") else "Qwen2VLImageProcessorPil"
    cls = getattr(transformers, name, None) or transformers.Qwen2VLImageProcessor
    return cls(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=224 * 224)


def chat_batches(n_batches: int, batch_size: int, vocab: int, seed: int = 0) -> list[list[dict]]:
    """Processed examples: `input_ids` with image placeholders, `pixel_values`, `image_grid_thw`."""
    rng = np.random.default_rng(seed)
    processor = image_processor()
    batches = []
    for _ in range(n_batches):
        batch = []
        for _ in range(batch_size):
            text = int(np.clip(rng.lognormal(np.log(MEDIAN_TEXT), SIGMA), 4, MAX_TEXT))
            ids, pixels, grids = [], [], []
            for _ in range(int(rng.integers(0, 3))):
                h, w = rng.choice(IMAGE_SIDES, 2)
                out = processor(images=[rng.integers(0, 256, (h, w, 3), dtype=np.uint8)], return_tensors="pt")
                pixels.append(out["pixel_values"])
                grids.append(out["image_grid_thw"])
                ids += [START_TOKEN] + [IMAGE_TOKEN] * (int(out["image_grid_thw"].prod()) // 4) + [END_TOKEN]
            split = int(rng.integers(1, text + 1))
            ids = rng.integers(5, vocab - 10, split).tolist() + ids + rng.integers(5, vocab - 10, text - split).tolist()
            example = {"input_ids": ids}
            if pixels:
                example["pixel_values"] = torch.cat(pixels)
                example["image_grid_thw"] = torch.cat(grids)
            batch.append(example)
        batches.append(batch)
    return batches


def padded_batch(examples: list[dict]) -> dict:
    """Right-padded text (`PaddedCollator`) plus the images in example order and `mm_token_type_ids`."""
    text = [{"input_ids": e["input_ids"], "mm_token_type_ids": [int(t == IMAGE_TOKEN) for t in e["input_ids"]]}
            for e in examples]
    batch = PaddedCollator()(text)
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
    return batch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_device_arguments(parser)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    common.add_batch_arguments(parser, batches=4, batch_size=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device name>/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, device_name = common.device_and_dtype(args)
    preset = PRESETS[args.preset]

    batches = chat_batches(args.batches, args.batch_size, preset["vocab"])
    real_tokens, padded_tokens = common.token_counts(batches)
    image_tokens = [sum(e["input_ids"].count(IMAGE_TOKEN) for e in b) for b in batches]
    base = build_model(preset, dtype, device)
    packer = PackedVisionCollator(model=packcollate.prepare(base))
    modes = {"padded-sdpa": (padded_batch, "sdpa"), "packed-sdpa": (packer, "sdpa"), "packcollate": (packer, "packcollate")}
    runs = {}
    for name, (collate, implementation) in modes.items():
        model = copy.deepcopy(base)
        use_backend(model, implementation)
        runs[name] = common.step_run(model, [collate(b) for b in batches], device)
        for batch in runs[name]["batches"]:
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
    # same weights: the first step's loss checks the modes agree
    results = common.round_robin(runs, args.repeats, device, sum(real_tokens), baseline="padded-sdpa")
    ideal = sum(padded_tokens) / sum(real_tokens)

    print(f"train step, Qwen2-VL-shaped '{args.preset}' ({preset['layers']} text layers, hidden {preset['hidden']}, "
          f"{preset['vision_depth']} vision layers), {args.batch_size} image chats per step, {device_name}, "
          f"{str(dtype).replace('torch.', '')}")
    print(f"tokens per step: real {np.mean(real_tokens):.0f} (image {np.mean(image_tokens):.0f}), "
          f"padded {np.mean(padded_tokens):.0f}")
    common.print_step_table(results, 14)
    print(f"{'ideal (padded/real text tokens)':32} {ideal:13.2f}x")
    common.print_loss_spread(results)
    print(describe())

    out = {
        "benchmark": "vlm_step",
        "device": device_name,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "command": common.command_line(__file__, argv),
        "data": {"median_text": MEDIAN_TEXT, "sigma": SIGMA, "image_sides": list(IMAGE_SIDES), "images_per_chat": [0, 2],
                 "batch_size": args.batch_size, "batches": args.batches, "real_tokens": real_tokens,
                 "image_tokens": image_tokens, "padded_tokens": padded_tokens},
        "model": {"preset": args.preset, **preset},
        "versions": library_versions("torch", "transformers"),
        "ideal_speedup": ideal,
        "modes": results,
    }
    folder = args.out or Path(__file__).parent / "results" / device_name
    save_result(out, folder / f"vlm_step_{args.preset}_{out['dtype']}.json")
    return out


if __name__ == "__main__":
    main()
