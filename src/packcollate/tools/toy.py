"""Small local data and a character-level tokenizer: demos, examples and tests without downloads.

- `char_tokenizer()`: a `PreTrainedTokenizerFast`, one token per printable ASCII character, with
  `<pad> <bos> <eos> <unk>` and a chat template whose assistant turns carry generation markers
  (so `return_assistant_tokens_mask=True` and TRL's `assistant_only_loss` work).
- `arithmetic_problems(n, seed)`: instruction-style arithmetic word problems with worked answers of
  very uneven length (one to many steps), as `{"prompt", "completion"}` dicts.
- `load_arithmetic()`: the shipped set (`data/arithmetic.jsonl`, 2,000 problems, seed 0), the demo's data.
- `tokenize_prompt_completion(...)`: `input_ids` and a `completion_mask`, TRL's prompt/completion format.
"""

from __future__ import annotations

import json
import string
from functools import lru_cache
from importlib import resources

import numpy as np

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ARITHMETIC_FILE = "arithmetic.jsonl"
ARITHMETIC_SIZE = 2000

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ines", "Jon", "Kemal", "Lea"]
THINGS = ["apples", "books", "coins", "marbles", "stamps", "shells", "cards", "pencils", "eggs", "tickets"]


@lru_cache(maxsize=1)
def char_tokenizer():
    """A character-level tokenizer (102 tokens) with a chat template; built locally, nothing downloaded."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(string.printable[:95]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _problem(rng: np.random.Generator) -> dict:
    """One word problem: a start amount, then 0-10 operations, each a worked step in the answer."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    boxes, per_box = int(rng.integers(2, 10)), int(rng.integers(2, 25))
    total = boxes * per_box
    story = [f"{name} has {boxes} boxes with {per_box} {thing} each."]
    steps = [f"{boxes} x {per_box} = {total}."]
    for _ in range(int(rng.geometric(0.3)) - 1 if rng.random() < 0.9 else int(rng.integers(6, 11))):
        if rng.random() < 0.5 or total < 4:
            n = int(rng.integers(1, 30))
            who = rng.choice(NAMES)
            story.append(f"{who} gives {name} {n} more.")
            steps.append(f"{total} + {n} = {total + n}.")
            total += n
        else:
            n = int(rng.integers(1, total))
            story.append(f"{name} gives away {n}.")
            steps.append(f"{total} - {n} = {total - n}.")
            total -= n
    story.append(f"How many {thing} does {name} have now?")
    steps.append(f"The answer is {total}.")
    return {"prompt": " ".join(story), "completion": " ".join(steps)}


def arithmetic_problems(n: int, seed: int = 0) -> list[dict]:
    """`n` arithmetic word problems `{"prompt", "completion"}`; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return [_problem(rng) for _ in range(n)]


def load_arithmetic() -> list[dict]:
    """The shipped problems (`packcollate/tools/data/arithmetic.jsonl`): `arithmetic_problems(2000, seed=0)`."""
    text = resources.files(__package__).joinpath("data", ARITHMETIC_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


def write_arithmetic(path) -> None:
    """Regenerate the shipped file: `python -c "from packcollate.tools.toy import *; write_arithmetic('src/packcollate/tools/data/arithmetic.jsonl')"`."""
    with open(path, "w", encoding="utf-8") as f:
        for problem in arithmetic_problems(ARITHMETIC_SIZE, seed=0):
            f.write(json.dumps(problem) + "\n")


def tokenize_prompt_completion(problems: list[dict], tokenizer=None) -> list[dict]:
    """Tokenize `{"prompt", "completion"}` as `<|user|>prompt<|end|><|assistant|>completion<|end|>`.

    Returns `{"input_ids", "completion_mask"}` per problem; the mask is 1 on the completion and its end token.
    """
    tokenizer = tokenizer or char_tokenizer()
    user, assistant, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>"))
    out = []
    for problem in problems:
        prompt = [user, *tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"], end, assistant]
        completion = [*tokenizer(problem["completion"], add_special_tokens=False)["input_ids"], end]
        out.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return out
