"""Locally built vision-language processors and small image chats: vision-language tests and
benchmarks without downloads.

- `vision_processor(family="qwen2_vl")`: a character-level tokenizer (`toy.char_tokenizer`'s
  characters plus the family's vision tokens) with a multimodal chat template (assistant turns carry
  generation markers), and the family's image processor for the tiny towers of
  `compat.vision.tiny_vision_config`:
  - `"qwen2_vl"`: `Qwen2VLProcessor` (`<|vision_start|> <|image_pad|> <|vision_end|> <|video_pad|>`,
    a `Qwen2VLImageProcessor` for 2-px patches);
  - `"gemma3"`: `Gemma3Processor` (`<start_of_image> <image_soft_token> <end_of_image>`, images
    resized to the tower's side, `mm_tokens_per_image` soft tokens each; it returns the
    `token_type_ids` that mark image tokens as bidirectional).
- `vision_token_ids(processor)`: the ids a tiny model config needs (`image_token_id`, …).
- `image_chats(n, seed)`: TRL's conversational vision format, `{"messages", "images"}`, with 0–2 PIL
  images of mixed sizes per chat and uneven text.
"""

from __future__ import annotations

import string
from functools import lru_cache

import numpy as np

from .toy import SPECIAL_TOKENS

#: The vision tokens of each family's toy tokenizer, and the chat-template text of one image.
VISION_TOKENS = {
    "qwen2_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
}
_IMAGE_TEXT = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "gemma3": "<start_of_image>"}
# Gemma3Processor reads its tokens from the tokenizer's named special tokens
_NAMED_TOKENS = {"gemma3": {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                            "eoi_token": "<end_of_image>"}}


def chat_template(family: str = "qwen2_vl") -> str:
    """A multimodal chat template: `<|user|>…<|end|><|assistant|>…<|end|>`, images as the family's text."""
    content = (
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + _IMAGE_TEXT[family] +
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    )
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>" + content + "<|end|>"
        "{% else %}<|assistant|>{% generation %}" + content + "<|end|>{% endgeneration %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


IMAGE_SIZES = ((8, 12), (16, 8), (8, 8), (12, 12), (16, 16))


@lru_cache(maxsize=None)
def _tokenizer(family: str = "qwen2_vl"):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + VISION_TOKENS[family]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable[:95]) + ["\n"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines too
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>",
                                        extra_special_tokens=_NAMED_TOKENS.get(family, specials[4:]))
    tokenizer.add_tokens(specials[4:], special_tokens=True)  # matched whole (already in the vocabulary)
    tokenizer.chat_template = chat_template(family)
    return tokenizer


def vision_processor(config=None, family: str = "qwen2_vl"):
    """The family's processor built locally; `config`: the tiny model's (default `tiny_vision_config(family)`).

    Images only: transformers' video processors need torchvision (absent here), so the Qwen2-VL
    processor is built without one (its class is checked against a registry that is empty without
    torchvision).
    """
    from ..compat.vision import qwen_image_processor, tiny_vision_config

    if family not in VISION_TOKENS:
        raise ValueError(f"family: expected one of {sorted(VISION_TOKENS)}, got {family!r}")
    config = config or tiny_vision_config(family)
    if family == "gemma3":
        import transformers

        image_processor = getattr(transformers, "Gemma3ImageProcessorPil", None) or transformers.Gemma3ImageProcessor
        side = config.vision_config.image_size
        return transformers.Gemma3Processor(image_processor=image_processor(size={"height": side, "width": side}),
                                            tokenizer=_tokenizer(family), chat_template=chat_template(family),
                                            image_seq_length=config.mm_tokens_per_image)
    from transformers import Qwen2VLProcessor

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageQwen2VLProcessor(image_processor=qwen_image_processor(config), tokenizer=_tokenizer(family),
                                 chat_template=chat_template(family))


def vision_token_ids(processor) -> dict[str, int]:
    """Config fields naming the processor's vision tokens: `image_token_id`, `video_token_id`, … (Gemma 3:
    `image_token_index`, `boi_token_index`, `eoi_token_index`)."""
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    if type(processor).__name__ == "Gemma3Processor":
        return {"image_token_index": tokenizer.image_token_id, "boi_token_index": tokenizer.boi_token_id,
                "eoi_token_index": tokenizer.eoi_token_id}
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def image_chats(n: int, seed: int = 0) -> list[dict]:
    """`n` chats `{"messages": [user, assistant], "images": [PIL.Image, …]}` with 0–2 images each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase + " "))
    chats = []
    for _ in range(n):
        count = int(rng.integers(0, 3))
        images = [Image.fromarray(rng.integers(0, 256, (*IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))], 3),
                                               dtype=np.uint8)) for _ in range(count)]
        question = "".join(rng.choice(letters, int(rng.integers(3, 20))))
        answer = "".join(rng.choice(letters, int(rng.integers(2, 30))))
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        chats.append({"messages": [{"role": "user", "content": content},
                                   {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                      "images": images})
    return chats
