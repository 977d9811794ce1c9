"""Shared by the examples: the shipped arithmetic problems and a tiny Llama-shaped model.

Replace `tiny_model()` by
`packcollate.prepare(AutoModelForCausalLM.from_pretrained(your_model, attn_implementation="packcollate"))`
and the data by your own tokenized dataset to fine-tune for real (`prepare` restarts layers that carry
state, or compute attention inside the model, at every packed example; for other models it changes nothing).
"""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import packcollate
from packcollate.tools.toy import (
    char_tokenizer,
    load_arithmetic,
    tokenize_prompt_completion,
)


def tiny_model(model_path: str | None = None, attn_implementation: str = "packcollate"):
    """A local model (`model_path`, never downloaded) or a tiny random Llama sized for the char tokenizer."""
    if model_path:
        return packcollate.prepare(AutoModelForCausalLM.from_pretrained(
            model_path, attn_implementation=attn_implementation, local_files_only=True))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(char_tokenizer()), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    return packcollate.prepare(AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation))


def arithmetic_features(n: int, offset: int = 0) -> list[dict]:
    """`n` shipped problems as `{"input_ids", "completion_mask"}` (TRL's prompt/completion format)."""
    return tokenize_prompt_completion(load_arithmetic()[offset : offset + n])


def arithmetic_preferences(n: int, offset: int = 0) -> list[dict]:
    """`n` shipped problems as preference pairs `{"prompt", "chosen", "rejected"}`: the worked answer is
    chosen; a wrong final answer (every other pair) or the answer cut in half is rejected."""
    pairs = []
    for i, problem in enumerate(load_arithmetic()[offset : offset + n]):
        worked = problem["completion"]
        rejected = worked[: len(worked) // 2] if i % 2 else worked.rsplit(" ", 1)[0] + " 0."
        pairs.append({"prompt": problem["prompt"], "chosen": " " + worked, "rejected": " " + rejected})
    return pairs
