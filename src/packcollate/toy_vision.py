"""A locally built Qwen2-VL processor and small image chats: vision-language tests and benchmarks
without downloads.

- `vision_processor()`: `Qwen2VLProcessor` = a character-level tokenizer (`toy.char_tokenizer`'s
  characters plus `<|vision_start|> <|image_pad|> <|vision_end|> <|video_pad|>`) with a multimodal
  chat template (assistant turns carry generation markers), and a `Qwen2VLImageProcessor` for 2-px
  patches (`compat.vision.qwen_image_processor`).
- `vision_token_ids(processor)`: the ids a tiny model config needs (`image_token_id`, …).
- `image_chats(n, seed)`: TRL's conversational vision format, `{"messages", "images"}`, with 0–2 PIL
  images of mixed sizes per chat and uneven text.
"""

from __future__ import annotations

import string
from functools import lru_cache

import numpy as np

from .toy import SPECIAL_TOKENS

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
_CONTENT = (
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>" + _CONTENT + "<|end|>"
    "{% else %}<|assistant|>{% generation %}" + _CONTENT + "<|end|>{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
IMAGE_SIZES = ((8, 12), (16, 8), (8, 8), (12, 12), (16, 16))


@lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + VISION_TOKENS
    vocab = {token: i for i, token in enumerate(specials + list(string.printable[:95]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>", additional_special_tokens=specials[4:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def vision_processor(config=None):
    """A `Qwen2VLProcessor` built locally; `config`: the tiny model's (default `tiny_vision_config("qwen2_vl")`).

    Images only: transformers' video processors need torchvision (absent here), so the processor is
    built without one (its class is checked against a registry that is empty without torchvision).
    """
    from transformers import Qwen2VLProcessor

    from .compat.vision import qwen_image_processor, tiny_vision_config

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    config = config or tiny_vision_config("qwen2_vl")
    return ImageQwen2VLProcessor(image_processor=qwen_image_processor(config), tokenizer=_tokenizer(),
                            chat_template=CHAT_TEMPLATE)


def vision_token_ids(processor) -> dict[str, int]:
    """Config fields naming the processor's vision tokens: `image_token_id`, `video_token_id`, …"""
    ids = processor.tokenizer.convert_tokens_to_ids
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
