"""Text and image token counts of image+text datasets (for `packcollate stats` and token budgets).

Two kinds of split:

- processed: an `input_ids` column whose image placeholders (`image_token_id`, `video_token_id` of
  the model config) stand for the image features; counted in Arrow / numpy, no Python per token;
- raw chats (`messages` or `prompt`/`completion`, plus `images` / `image`): processed one example
  at a time by TRL's vision collator with a local processor, exactly as `PackedSFTTrainer` does.

`image` counts are the placeholder tokens (what the language model attends over), `text` the rest.
"""

from __future__ import annotations

import numpy as np

from ..layout import cumulative

IMAGE_COLUMNS = ("images", "image")
PROCESSED_VISION_COLUMNS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def placeholder_token_ids(config) -> list[int]:
    """Image / video placeholder token ids named by a model config (or its text config)."""
    ids = []
    for source in (config, getattr(config, "text_config", None)):
        for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
            value = getattr(source, name, None)
            if isinstance(value, int) and value not in ids:
                ids.append(value)
    return ids


def is_image_split(columns) -> bool:
    return any(c in columns for c in IMAGE_COLUMNS + PROCESSED_VISION_COLUMNS)


def processed_counts(rows, image_token_ids) -> tuple[np.ndarray, np.ndarray]:
    """`(n,)` total and `(n,)` image-placeholder tokens of each row's `input_ids`, vectorised."""
    if hasattr(rows, "with_format"):
        import pyarrow.compute as pc

        column = rows.with_format("arrow")["input_ids"]
        lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
        flat = pc.list_flatten(column).to_numpy()
    else:
        arrays = [np.asarray(row["input_ids"]).reshape(-1) for row in rows]
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    is_image = np.isin(flat, np.asarray(list(image_token_ids), dtype=np.int64)).astype(np.int64)
    images_before = cumulative(is_image)  # (N+1,): image tokens before each flat position
    ends = np.cumsum(lengths)
    image = images_before[ends] - images_before[ends - lengths]
    return lengths, image


def raw_counts(rows, processor, image_token_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """`(n,)` total and `(n,)` image tokens of raw chats, through TRL's vision collator and `processor`."""
    try:
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
    except ImportError as error:
        raise ImportError("counting tokens of raw image chats needs TRL: pip install 'packcollate[trl]'") from error
    from PIL import Image

    collate = DataCollatorForVisionLanguageModeling(processor=processor)
    ids = list(image_token_ids or [])
    for name in ("image_token_id", "video_token_id"):
        value = getattr(processor, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    total, image = [], []
    for index, row in enumerate(rows):
        example = dict(row)
        for key in IMAGE_COLUMNS:
            if key in example:
                value = example[key]
                values = value if isinstance(value, list) else [value]
                try:
                    values = [Image.open(v) if isinstance(v, str) else v for v in values]
                except OSError as error:
                    raise ValueError(f"example {index}, key {key!r}: expected images or image paths, got "
                                     f"{values!r} ({error})") from None
                example[key] = values if isinstance(value, list) else values[0]
        input_ids = collate([example])["input_ids"][0].numpy()
        total.append(len(input_ids))
        image.append(int(np.isin(input_ids, ids).sum()))
    return np.asarray(total, dtype=np.int64), np.asarray(image, dtype=np.int64)


def _summary(values: np.ndarray) -> dict:
    return {"total": int(values.sum()), "mean": float(values.mean()), "min": int(values.min()),
            "p50": int(np.percentile(values, 50)), "p90": int(np.percentile(values, 90)), "max": int(values.max())}


def image_report(counts: dict) -> dict:
    """`{split: (total, image)}` -> per split: examples with images, and text / image token summaries."""
    out = {}
    for name, (total, image) in counts.items():
        out[name] = {"examples_with_images": int((image > 0).sum()), "image_share": float(image.sum() / max(total.sum(), 1)),
                     "text": _summary(total - image), "image": _summary(image)}
    return out


def format_image_report(report: dict) -> str:
    lines = [f"{'split':14} {'with images':>11} {'image share':>11}   text tokens (mean/p50/p90/max)   "
             f"image tokens (mean/p50/p90/max)"]
    for name, r in report.items():
        t, i = r["text"], r["image"]
        lines.append(f"{name[:14]:14} {r['examples_with_images']:11d} {r['image_share']:10.1%}   "
                     f"{t['mean']:8.1f} {t['p50']:6d} {t['p90']:6d} {t['max']:6d}        "
                     f"{i['mean']:8.1f} {i['p50']:6d} {i['p90']:6d} {i['max']:6d}")
    return "\n".join(lines)
