"""`PackedVisionCollator`: padding-free batches of image+text (and video+text) examples.

A layer over `PackedCollator`: the text keys are packed by `PackedCollator` itself (same labels,
length policy, `cu_seq_lens`, stats), and this module adds what vision-language models need:

- the vision inputs of every example (`pixel_values`, `image_grid_thw`, `pixel_values_videos`,
  `video_grid_thw`, …) concatenated along the image axis in example order, so that the model's
  image features land on the image tokens of their own example;
- for families with multi-section rotary positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V, …:
  models that expose `get_rope_index`), the positions of each example computed by that model's own
  `get_rope_index`, one example at a time, so they restart at every example exactly as they would
  in an unpacked batch.

Output, for `k` examples packed into `N` tokens (everything `PackedCollator` emits, plus):

| key | shape | value |
| --- | --- | --- |
| `position_ids` | `(1, N)` int64 (1-D rotary), or `(1 + S, 1, N)` int64 (multi-section) | row 0: text positions `0 … l_i-1` per example (`1 … l_i` for PaliGemma, whose positions are 1-indexed: `POSITION_OFFSETS`) (what the attention and mask read); rows 1…S: the model's rotary positions per example |
| vision keys | each example's value concatenated on the image axis | e.g. `pixel_values` `(P, D)` and `image_grid_thw` `(I, 3)` for Qwen2-VL; `pixel_values` `(I, C, H, W)` for LLaVA and Gemma 3; `(1, I, C, H, W)` for Idefics3 / SmolVLM; for Pixtral-tower families (Mistral 3) `(I, C, H_max, W_max)`, zero-padded bottom/right, and LLaVA-NeXT `(I, P_max, C, H, W)`, zero-padded tiles, with `image_sizes` `(I, 2)` |

For families whose image tokens attend to each other in both directions (Gemma 3: the processor's
`token_type_ids` mark image tokens), the batch also holds `bidirectional_block_ids` `(1, N)` int64:
the family's own block ids (transformers' `get_block_sequence_ids_for_mask`) over the packed row, -1
on ordinary tokens. The `packcollate` backend lets a block's tokens see each other inside their own
example only. transformers' kernels do not read it, and their packed masks look Gemma 3's blocks up
by in-sequence position, so the collator refuses Gemma 3 batches with marks for a model on another
backend. PaliGemma's `token_type_ids` (the prefix, image and prompt, attends both ways) stay in the
batch: the model builds its own prefix mask from them (`MODEL_MASKED_BLOCKS`; the `packcollate`
backend hands its layers, flagged bidirectional, that mask, inside the examples the kwargs name). Where
transformers' own mask lets the blocks reach across packed sequences (5.17), the collator refuses such
batches for a model on another backend.

Qwen-style text models read a `(4, 1, N)` `position_ids` as "text positions, then the three rotary
sections" (transformers documents this layout for packed inputs); the text row keeps the examples
apart in transformers' own kernels, and the `packcollate` attention backend reads `cu_seq_lens_*`.
Examples without images are plain text: their rotary positions are their text positions.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError, InputTypeError, UnsupportedError
from ..layout import BACKEND_NAME, BLOCK_IDS, FLASH_KWARGS, IGNORE_INDEX, cumulative, to_torch
from ..unwrap import unwrap_model
from .text import PackedCollator

#: Per-example vision inputs, concatenated on the image axis. Any other non-token key is an error.
VISION_KEYS = (
    "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
    "image_sizes", "pixel_attention_mask", "image_attention_mask", "spatial_shapes", "pixel_position_ids",
    "batch_num_images",
)
#: Families whose processors return the images of one example as one batch row: `(1, I, C, H, W)`;
#: their images are concatenated on axis 1.
BATCHED_IMAGE_FAMILIES = ("idefics2", "idefics3", "smolvlm")
#: Per-token keys of the text, packed by `PackedCollator` (others pass through it as per-token keys).
_TEXT_KEYS = ("input_ids", "labels", "attention_mask", "completion_mask", "assistant_masks", "mm_token_type_ids",
              "token_type_ids")
#: The packing kwargs of the text row; a vision tower must not see them (see `shield_vision_tower`).
PACKING_KWARGS = (*FLASH_KWARGS, BLOCK_IDS)


def _gemma3_blocks(type_ids: torch.Tensor) -> torch.Tensor:
    from transformers.models.gemma3.modeling_gemma3 import (
        get_block_sequence_ids_for_mask,
    )

    return get_block_sequence_ids_for_mask(type_ids)


#: Families whose image tokens attend to each other bidirectionally: model_type -> (the per-token key
#: that marks them, the family's own `(1, N)` marks -> `(1, N)` block ids, -1 outside blocks).
BIDIRECTIONAL_BLOCKS = {"gemma3": ("token_type_ids", _gemma3_blocks)}
#: Families whose model masks its own bidirectional blocks from the marks (PaliGemma: one prefix block per
#: sequence): their `token_type_ids` pass through, no block ids. Exact on the packcollate backend in every
#: release (it keeps the examples apart inside any 4-D mask); on transformers' own backends only where its
#: mask keeps the blocks inside their packed sequence (`transformers_keeps_blocks_apart`: 5.24 yes, 5.17 no:
#: refused there).
MODEL_MASKED_BLOCKS = ("paligemma",)
#: Families whose text positions do not start at 0: model_type -> the default `position_ids_start`
#: (PaliGemma computes `arange(L) + 1` when given none).
POSITION_OFFSETS = {"paligemma": 1}
#: Models that cut each image back to its `image_sizes`: the images of different examples are zero-padded
#: at the end of every axis to the batch's largest, as their processors pad the images of one batch.
#: By vision tower (Pixtral: `(I, C, H, W)`, padded bottom/right) and by family (LLaVA-NeXT: `(I, P, C, H, W)`,
#: padded on the tile axis P; the model keeps each image's own tiles).
SIZE_CROPPED_TOWERS = ("pixtral",)
SIZE_CROPPED_FAMILIES = ("llava_next", "llava_onevision")
#: Families whose every image row (an image, or a tile / crop of one, on the image axis) takes the same
#: number of placeholder tokens: each example's placeholders are checked against its own rows, in
#: proportion to the batch's (`PackedVisionCollator.check_images_per_example`).
FIXED_TOKENS_PER_IMAGE = ("llava", "vipllava", "paligemma", "gemma3", "internvl", "aya_vision", "cohere2_vision",
                          "idefics2", "idefics3", "smolvlm")
# Vision inputs given per image or video to `get_rope_index` (the rest are pixels, not needed for positions).
_ROPE_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def find_rope_owner(model):
    """The module that owns `get_rope_index`: the model under any wrapper (`unwrap.unwrap_model`), or the
    inner model of a composite one (`.model`); None when neither has it."""
    owner = unwrap_model(model) if isinstance(model, torch.nn.Module) else None
    while owner is not None and not callable(getattr(owner, "get_rope_index", None)):
        inner = getattr(owner, "model", None)
        owner = inner if isinstance(inner, torch.nn.Module) else None
    return owner


@functools.lru_cache(maxsize=1)
def transformers_keeps_blocks_apart() -> bool:
    """Whether this transformers' own causal mask keeps bidirectional blocks (`block_sequence_ids`:
    PaliGemma's prefix) inside their packed sequence (5.24: yes; 5.17: its block overlay reaches across
    packed sequences). Read once, from sdpa's mask of two packed two-token sequences in one block id."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    config = LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1, vocab_size=8)
    config._attn_implementation = "sdpa"
    try:
        mask = create_causal_mask(config, torch.zeros(1, 4, 8), None, None, position_ids=torch.tensor([[0, 1, 0, 1]]),
                                  block_sequence_ids=torch.zeros(1, 4, dtype=torch.long))
    except TypeError:  # a release without blocks in its masks
        return False
    return mask is not None and not bool(mask[0, 0, 2, 0]) and not bool(mask[0, 0, 0, 2])


def _drop_packing_kwargs(module, args, kwargs):
    return args, {key: value for key, value in kwargs.items() if key not in PACKING_KWARGS}


def shield_vision_tower(model) -> list[str]:
    """Keep the text row's `cu_seq_lens_*` / `max_length_*` out of `model`'s vision tower; idempotent.

    transformers forwards a VLM's `**kwargs` to its vision tower (LLaVA, Gemma 3, …: measured on 5.24),
    whose batch is `(images, patches)`: the text's sequence layout means nothing there (the `packcollate`
    backend refuses it; a flash varlen kernel would attend across images). A forward pre-hook on every
    module built from one of the model's vision sub-configs drops those keys. Returns the names of the
    modules hooked.
    """
    config = getattr(model, "config", None)
    vision_types = {
        getattr(getattr(config, name, None), "model_type", None) for name in ("vision_config", "audio_config")
    } - {None}
    hooked: list[str] = []
    for name, module in model.named_modules():
        module_type = getattr(getattr(module, "config", None), "model_type", None)
        if module_type not in vision_types or any(name.startswith(outer + ".") for outer in hooked):
            continue
        if not getattr(module, "_packcollate_shielded", False):
            # first among the module's pre-hooks: `prepare`'s model hooks must not see them either
            module.register_forward_pre_hook(_drop_packing_kwargs, with_kwargs=True, prepend=True)
            module._packcollate_shielded = True
        hooked.append(name)
    return hooked


def _model_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise InputTypeError(f"model: expected a transformers model (with a .config), got {type(model).__name__}")
    return config


def _token_id(config, name: str) -> int | None:
    value = getattr(config, name, None)
    if value is None and getattr(config, "text_config", None) is not None:
        value = getattr(config.text_config, name, None)
    return value if isinstance(value, int) else None


def _flat_tokens(value, index: int, key: str):
    """A per-token value as given, or its single row when a processor returned it batched `(1, L)`."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
    if isinstance(array, np.ndarray) and array.ndim == 2:
        if array.shape[0] != 1:
            raise InputError(
                f"example {index}, key {key!r}: expected one example's tokens, shape (L,) or (1, L), got shape "
                f"{tuple(array.shape)}; call the processor on one example at a time, or unbatch its output"
            )
        return array[0]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (list, np.ndarray)):
        return value[0]
    return value


def _as_tensor(value, index: int, key: str) -> torch.Tensor:
    try:
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise InputError(f"example {index}, key {key!r}: expected a numeric array, got {type(value).__name__} "
                         f"({error})") from None


@dataclass(kw_only=True)
class PackedVisionCollator(PackedCollator):
    """Pack image+text examples (processor outputs, one dict per example) into one row.

    Every `PackedCollator` option applies to the text (see its docstring). Each example dict holds
    `input_ids` (`(L,)` or the processor's `(1, L)`), optionally `labels`, `completion_mask` /
    `assistant_masks`, per-token `mm_token_type_ids` / `token_type_ids`, and its vision inputs
    (`VISION_KEYS`): absent or None for an example without images.

    Args:
        model: the model the batches are for (a transformers model, its inner `.model`, or a PEFT
            wrapper). When it (under any wrapper, `unwrap.unwrap_model`, or its inner `.model`) has
            `get_rope_index`, the multi-section rotary positions of each example come from it; its
            config also names the image / video placeholder tokens. None: 1-D positions only.
            Building the collator calls `shield_vision_tower(model)`: the text's packing kwargs
            never reach the vision tower.
        causal_image_tokens: for families whose processors mark tokens with `token_type_ids` so
            that they attend to each other bidirectionally (Gemma 3's images: `BIDIRECTIONAL_BLOCKS`;
            PaliGemma's prefix: `MODEL_MASKED_BLOCKS`): False (default) keeps them (Gemma 3:
            `bidirectional_block_ids`, exact with the `packcollate` backend; PaliGemma: the marks,
            exact on every backend); a Gemma 3 batch of several such examples for a model on another
            backend (transformers' packed sliding-window mask looks the blocks up by in-sequence
            position), or a batch of a family without a known block rule, is refused. True drops
            `token_type_ids`, so those tokens are causal like text (a different model than the one
            pre-trained).
        mask_vision_tokens: label the image / video placeholder tokens -100 (they are replaced by
            image features). Default False: labels stay as given, like TRL's and transformers'
            padded batches (TRL trains on them), so packed and padded losses match.
        vision_keys: the per-example vision keys (default `VISION_KEYS`).
        position_ids_start: first text position of every example; None (default): the family's own
            (`POSITION_OFFSETS`: 1 for PaliGemma, else 0).

    Attributes:
        rope_owner: the module whose `get_rope_index` gives each example's multi-section rotary
            positions (`find_rope_owner(model)`), or None (1-D positions).

    Limits: `overflow="truncate"` / `"split"` with a `max_seq_length` are refused (a cut through
    an image's tokens would separate them from its pixels); use `"drop"` or `"error"`. Pre-packed
    rows (`seq_lengths`) are refused: each example must be one sequence with its own images.
    """

    model: object = field(default=None, repr=False, compare=False)
    position_ids_start: int | None = None
    causal_image_tokens: bool = False
    mask_vision_tokens: bool = False
    vision_keys: Sequence[str] = VISION_KEYS

    def __post_init__(self) -> None:
        self.rope_owner = find_rope_owner(self.model)
        self._rope_parameters: set[str] = set()
        self._config = _model_config(self.model) if self.model is not None else None
        if self.rope_owner is not None:
            self._config = self.rope_owner.config
            self._rope_parameters = set(inspect.signature(self.rope_owner.get_rope_index).parameters)
        self._model_type = getattr(self._config, "model_type", None)
        if self.position_ids_start is None:
            self.position_ids_start = POSITION_OFFSETS.get(self._model_type, 0)
        super().__post_init__()
        if self.max_seq_length is not None and self.overflow in ("truncate", "split"):
            raise InputError(
                f"overflow: expected 'drop' or 'error' with max_seq_length={self.max_seq_length} for image+text "
                f"examples (a {self.overflow} through an image's tokens separates them from its pixels), got "
                f"{self.overflow!r}"
            )
        self.vision_keys = tuple(self.vision_keys)
        self._image_token = _token_id(self._config, "image_token_id") if self._config is not None else None
        if self._image_token is None and self._config is not None:
            self._image_token = _token_id(self._config, "image_token_index")
        self._video_token = _token_id(self._config, "video_token_id") if self._config is not None else None
        if isinstance(self.model, torch.nn.Module):
            shield_vision_tower(self.model)
        self._image_axis = 1 if self._model_type in BATCHED_IMAGE_FAMILIES else 0
        tower = getattr(getattr(self._config, "vision_config", None), "model_type", None)
        self._pad_images = tower in SIZE_CROPPED_TOWERS or self._model_type in SIZE_CROPPED_FAMILIES

    # -- splitting examples into text and vision ------------------------------------------------

    def _split(self, features: Sequence[Mapping]) -> tuple[list[dict], list[dict]]:
        """Per example: the text features (flat per-token values) and the vision values present."""
        if isinstance(features, Mapping) or not isinstance(features, Sequence):
            raise InputTypeError(f"expected a list of feature dicts, got {type(features).__name__}")
        texts, visions = [], []
        for i, example in enumerate(features):
            if not isinstance(example, Mapping):
                raise InputTypeError(f"example {i}: expected a dict of features, got {type(example).__name__}")
            if "seq_lengths" in example:
                raise InputError(f"example {i}, key 'seq_lengths': expected one example per dict with its own "
                                 f"images, got a pre-packed row; pack image+text examples with this collator only")
            text, vision = {}, {}
            for key, value in example.items():
                if key == "token_type_ids" and self.causal_image_tokens:
                    continue
                if key in self.vision_keys:
                    if value is not None:
                        vision[key] = _as_tensor(value, i, key)
                elif key in _TEXT_KEYS or key not in self.passthrough_keys:
                    text[key] = _flat_tokens(value, i, key)
                else:
                    text[key] = value
            texts.append(text)
            visions.append(vision)
        return texts, visions

    def attention_backend(self) -> str | None:
        """The attention implementation of the model's text side, read at call time."""
        text_config = self._config.get_text_config() if hasattr(self._config, "get_text_config") else self._config
        return getattr(text_config, "_attn_implementation", None) or getattr(self._config, "_attn_implementation", None)

    def _block_ids(self, batch: dict, examples: int) -> np.ndarray | None:
        """`(1, N)` int64 bidirectional block ids of the packed row (the family's own rule), or None when
        the batch has none; raises when they cannot be kept exact (see `causal_image_tokens`)."""
        rule = BIDIRECTIONAL_BLOCKS.get(self._model_type)
        key = rule[0] if rule is not None else "token_type_ids"
        if key not in batch or self.causal_image_tokens:
            return None
        if self._model_type in MODEL_MASKED_BLOCKS:
            backend = self.attention_backend()
            if examples > 1 and backend != BACKEND_NAME and not transformers_keeps_blocks_apart():
                raise UnsupportedError(
                    f"key {key!r}: the bidirectional prefix blocks of {examples} packed {self._model_type} examples are "
                    f"kept apart by this transformers' own mask only on attn_implementation={BACKEND_NAME!r} (its "
                    f"block overlay reaches across packed sequences), got a model on {backend!r}; load the model with "
                    f"attn_implementation={BACKEND_NAME!r}, or pass causal_image_tokens=True"
                )
            return None
        if rule is None:
            if examples > 1 and (np.asarray(batch[key]) != 0).any():
                raise UnsupportedError(
                    f"key 'token_type_ids': expected no bidirectional token blocks for model_type {self._model_type!r} "
                    f"(no block rule is known for it here: {sorted([*BIDIRECTIONAL_BLOCKS, *MODEL_MASKED_BLOCKS])}), got "
                    f"them in {examples} packed examples; "
                    + ("pass model= (its family's rule keeps the blocks), " if self._config is None else "")
                    + "pass causal_image_tokens=True (tokens attend causally) or batch one example at a time"
                )
            return None
        blocks = rule[1](torch.as_tensor(batch[key], dtype=torch.long)).numpy().astype(np.int64)
        if not (blocks >= 0).any():
            return None
        backend = self.attention_backend()
        if examples > 1 and backend != BACKEND_NAME:
            raise UnsupportedError(
                f"key {key!r}: bidirectional image blocks of {examples} packed examples are exact only with "
                f"attn_implementation={BACKEND_NAME!r}, got a model on {backend!r} (transformers' packed masks look "
                f"the blocks up by in-sequence position); load the model with attn_implementation={BACKEND_NAME!r}, "
                f"or pass causal_image_tokens=True"
            )
        return blocks

    def _kept_examples(self, texts: list[dict]) -> np.ndarray:
        """`(k',)` indices of the examples the length policy keeps (all, unless `overflow="drop"`)."""
        if self.max_seq_length is None or self.overflow != "drop":
            return np.arange(len(texts))
        lengths = np.fromiter((len(t["input_ids"]) for t in texts), dtype=np.int64, count=len(texts))
        return np.flatnonzero(lengths <= self.max_seq_length)

    def _concat_vision(self, visions: list[dict], kept: np.ndarray) -> dict[str, torch.Tensor]:
        """Each vision key of the kept examples, concatenated on the image axis in example order."""
        out = {}
        keys = [key for key in self.vision_keys if any(key in visions[i] for i in kept)]
        for key in keys:
            parts = [(int(i), visions[i][key]) for i in kept if key in visions[i]]
            for i, part in parts:
                if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                    raise InputError(f"example {i}, key {key!r}: expected finite values, got "
                                     f"{int((~torch.isfinite(part)).sum())} NaN or infinite values")
            if key == "pixel_values" and self._pad_images:
                parts = self._padded_images(parts, visions)
            axis = self._image_axis if key in ("pixel_values", "pixel_attention_mask") else 0
            reference = parts[0][1]
            for i, part in parts[1:]:
                if part.dim() != reference.dim() or part.shape[axis + 1:] != reference.shape[axis + 1:]:
                    raise InputError(
                        f"example {i}, key {key!r}: expected shape (…, {', '.join(map(str, reference.shape[axis + 1:]))}) "
                        f"after the image axis {axis} like example {parts[0][0]}, got {tuple(part.shape)}"
                    )
            out[key] = torch.cat([part for _, part in parts], dim=axis)
        return out

    def _padded_images(self, parts: list[tuple[int, torch.Tensor]], visions: list[dict]) -> list[tuple[int, torch.Tensor]]:
        """The images of each example (`(I_i, …)`) zero-padded at the end of every axis after the image
        axis to the largest (a family whose model cuts every image back to its `image_sizes`, which every
        example with images must give: `(I_i, 2)`)."""
        for i, part in parts:
            sizes = visions[i].get("image_sizes")
            if sizes is None or tuple(sizes.shape) != (part.shape[0], 2):
                raise InputError(
                    f"example {i}, key 'image_sizes': expected each image's (height, width), shape ({part.shape[0]}, 2) "
                    f"for 'pixel_values' {tuple(part.shape)} of {self._model_type} (the model cuts every image back "
                    f"to its size; images of different sizes are zero-padded to the largest), got "
                    f"{'none' if sizes is None else f'shape {tuple(sizes.shape)}'}"
                )
        if any(part.dim() != parts[0][1].dim() for _, part in parts):
            return parts  # the shape check names the example
        target = [max(sizes) for sizes in zip(*(part.shape[1:] for _, part in parts))]
        padded = []
        for i, part in parts:
            if list(part.shape[1:]) != target:
                pad = [amount for size, goal in zip(reversed(part.shape[1:]), reversed(target)) for amount in (0, goal - size)]
                part = torch.nn.functional.pad(part, pad)
            padded.append((i, part))
        return padded

    # -- every example's placeholders against its own images ----------------------------------

    def _placeholder_counts(self, batch: dict, lengths: np.ndarray, kind: int) -> np.ndarray | None:
        """`(k',)` image (`kind` 1) or video (2) placeholder tokens of each kept example, from `mm_token_type_ids`
        when given, else the config's placeholder ids (one vectorised pass over the packed row); None when
        neither tells them."""
        n = int(lengths.sum())
        if "mm_token_type_ids" in batch:
            marks = np.asarray(batch["mm_token_type_ids"]).reshape(-1)[:n] == kind
        else:
            token = self._image_token if kind == 1 else self._video_token
            if token is None:  # no model: the placeholders are unknown, nothing to check them by
                return None
            marks = np.asarray(batch["input_ids"]).reshape(-1)[:n] == token
        return np.add.reduceat(marks.astype(np.int64), cumulative(lengths)[:-1])

    def check_images_per_example(self, batch: dict, visions: list[dict], kept: np.ndarray, lengths: np.ndarray) -> None:
        """Refuse, naming the example, a batch where one example's placeholders do not match its own images.

        Joined, the images of all examples fill the placeholders of all examples in order: an example
        whose placeholders and images disagree (while the batch's totals agree) would be trained on
        another example's image. Checked per kept example: grid families (`image_grid_thw`, Qwen-VL /
        GLM-4V): placeholders `= sum(t*h*w) / merge**2` and `pixel_values` rows `= sum(t*h*w)` (videos:
        rows); `FIXED_TOKENS_PER_IMAGE` families: placeholders in the batch's proportion to image rows;
        every family: placeholders only with images and images only with placeholders.
        """
        images = self._placeholder_counts(batch, lengths, 1)
        videos = self._placeholder_counts(batch, lengths, 2)
        merge = getattr(getattr(self._config, "vision_config", None), "spatial_merge_size", None)
        rows = np.zeros(len(kept), dtype=np.int64)
        for slot, i in enumerate(kept.tolist()):
            vision = visions[i]
            pixels = vision.get("pixel_values")
            rows[slot] = 0 if pixels is None else (pixels.shape[self._image_axis] if pixels.dim() > self._image_axis else 0)
            for grid_key, pixel_key, count in (("image_grid_thw", "pixel_values", images),
                                               ("video_grid_thw", "pixel_values_videos", videos)):
                grid = vision.get(grid_key)
                if grid is None:
                    continue
                patches = int(grid.reshape(-1, 3).prod(-1).sum())
                given = vision.get(pixel_key)
                if given is None or given.shape[0] != patches:
                    raise InputError(
                        f"example {i}, key {pixel_key!r}: expected {patches} patch rows for its {grid_key} "
                        f"{grid.tolist()}, got {'none' if given is None else f'shape {tuple(given.shape)}'}"
                    )
                if grid_key == "image_grid_thw" and merge and count is not None and count[slot] != patches // merge**2:
                    raise InputError(
                        f"example {i}, key 'input_ids': expected {patches // merge**2} image placeholder tokens for its "
                        f"image_grid_thw {grid.tolist()} (t*h*w / {merge}**2), got {int(count[slot])}; its images would "
                        f"fill another example's placeholders"
                    )
            has_images = rows[slot] > 0 or vision.get("image_grid_thw") is not None
            if images is not None and bool(images[slot]) != has_images:
                raise InputError(
                    f"example {i}, key 'input_ids': expected image placeholder tokens exactly when the example has images, "
                    f"got {int(images[slot])} placeholders and {'its' if has_images else 'no'} images; its placeholders "
                    f"would take another example's images"
                )
        if self._model_type in FIXED_TOKENS_PER_IMAGE and images is not None and rows.sum():
            mismatched = np.flatnonzero(images * rows.sum() != rows * images.sum())
            if len(mismatched):
                slot = int(mismatched[0])
                raise InputError(
                    f"example {int(kept[slot])}, key 'input_ids': expected {images.sum() // max(rows.sum(), 1)} image "
                    f"placeholder tokens per image row as in the whole batch ({int(images.sum())} for {int(rows.sum())}), "
                    f"got {int(images[slot])} for its {int(rows[slot])}; its images would fill another example's placeholders"
                )

    # -- positions ------------------------------------------------------------------------------

    def token_modalities(self, ids: torch.Tensor, text: Mapping) -> torch.Tensor:
        """`(L,)` modality of each token: 0 text, 1 image, 2 video (from `mm_token_type_ids` when given)."""
        if "mm_token_type_ids" in text:
            return torch.as_tensor(np.asarray(text["mm_token_type_ids"]), dtype=torch.long)
        types = torch.zeros_like(ids)
        if self._image_token is not None:
            types[ids == self._image_token] = 1
        if self._video_token is not None:
            types[ids == self._video_token] = 2
        return types

    def _example_rope(self, index: int, text: Mapping, vision: Mapping) -> torch.Tensor:
        """`(S, L)` rotary positions of one example from the model's own `get_rope_index`."""
        ids = torch.as_tensor(np.asarray(text["input_ids"]), dtype=torch.long)
        kwargs = {key: vision[key] for key in _ROPE_KEYS if key in vision and key in self._rope_parameters}
        if "mm_token_type_ids" in self._rope_parameters:
            kwargs["mm_token_type_ids"] = self.token_modalities(ids, text)[None]
        try:
            positions, _ = self.rope_owner.get_rope_index(ids[None], **kwargs)
        except (StopIteration, RuntimeError, ValueError, IndexError, TypeError) as error:
            raise InputError(
                f"example {index}: get_rope_index of {type(self.rope_owner).__name__} failed on its "
                f"{int((self.token_modalities(ids, text) > 0).sum())} vision tokens and grids "
                f"{ {k: v.tolist() for k, v in kwargs.items() if k.endswith('grid_thw')} }: {error!r}"
            ) from None
        return positions[:, 0]

    def _rope_positions(self, texts, visions, kept, text_positions: np.ndarray) -> np.ndarray:
        """`(S, N)` rotary positions: the text positions, overwritten per example that has vision inputs.

        One `get_rope_index` call per example with images (the model's loop is per row anyway);
        text-only examples keep their text positions, which is what `get_rope_index` gives them."""
        with_vision = [i for i in kept.tolist() if any(k in visions[i] for k in _ROPE_KEYS)]
        # a batch of text only still gets the sections (its text positions): the layout never changes
        with_vision = with_vision or kept[:1].tolist()
        starts = cumulative(np.array([len(texts[i]["input_ids"]) for i in kept], dtype=np.int64))
        slot = {int(i): j for j, i in enumerate(kept.tolist())}
        sections = None
        for i in with_vision:
            with torch.no_grad():
                positions = self._example_rope(i, texts[i], visions[i]).numpy()
            if sections is None:
                sections = np.broadcast_to(text_positions, (positions.shape[0], len(text_positions))).copy()
            sections[:, starts[slot[i]]:starts[slot[i] + 1]] = positions
        return sections

    # -- the batch ------------------------------------------------------------------------------

    def __call__(self, features: Sequence[Mapping], return_tensors: str | None = None) -> dict:
        """Pack `features` (`k` example dicts with vision inputs) into one row; see the module docstring."""
        texts, visions = self._split(features)
        batch = super().__call__(texts, return_tensors="np")
        kept = self._kept_examples(texts)
        lengths = np.fromiter((len(texts[i]["input_ids"]) for i in kept.tolist()), dtype=np.int64, count=len(kept))
        self.check_images_per_example(batch, visions, kept, lengths)
        if self.mask_vision_tokens:
            placeholders = [t for t in (self._image_token, self._video_token) if t is not None]
            if placeholders:
                batch["labels"][np.isin(batch["input_ids"], placeholders)] = IGNORE_INDEX
        blocks = self._block_ids(batch, len(kept))
        if blocks is not None:
            batch[BLOCK_IDS] = blocks
        if self.rope_owner is not None:
            sections = self._rope_positions(texts, visions, kept, batch["position_ids"][0])
            batch["position_ids"] = np.concatenate([batch["position_ids"], sections])[:, None, :]
        vision = self._concat_vision(visions, kept)
        return_tensors = return_tensors or self.return_tensors
        if return_tensors == "pt":
            batch = to_torch(batch)
            batch.update(vision)
        else:
            batch.update({k: v.numpy() for k, v in vision.items()})
        return batch
