"""A padding-free reward model with TRL's RewardTrainer: each packed example scored at its last token.

    python examples/trl_reward.py --steps 20
    python examples/trl_reward.py --steps 20 --max-tokens 4096   # token-budget batches

`AutoModelForSequenceClassification` (Llama here; Qwen2/3, Gemma, Mistral heads work the same way)
applies its score head to every token; `PackedRewardTrainer` keeps each example's last non-pad
token (`packcollate.objectives.scores.packed_sequence_logits`), the token the padded forward scores.
"""

import argparse

import datasets
import torch
from _common import arithmetic_preferences
from transformers import AutoModelForSequenceClassification, LlamaConfig
from trl import RewardConfig

import packcollate  # noqa: F401
from packcollate.integrations.trl import PackedRewardTrainer
from packcollate.tools.toy import char_tokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--examples", type=int, default=200)
parser.add_argument("--max-tokens", type=int, default=None,
                    help="token budget per micro-batch (both sequences of a pair)")
parser.add_argument("--output-dir", default="/tmp/packcollate-trl-reward")
args = parser.parse_args()

torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(char_tokenizer()), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, num_labels=1,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
model = AutoModelForSequenceClassification.from_config(config, attn_implementation="packcollate")
trainer = PackedRewardTrainer(
    model=model,
    args=RewardConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
                      learning_rate=1e-3, logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[],
                      use_cpu=True),
    train_dataset=datasets.Dataset.from_list(arithmetic_preferences(args.examples)),
    processing_class=char_tokenizer(),
    max_tokens_per_batch=args.max_tokens,
)
result = trainer.train()
last = next(entry for entry in reversed(trainer.state.log_history) if "accuracy" in entry)
print(f"train loss {result.training_loss:.4f}, pair accuracy {last['accuracy']:.2f}, margin {last['margin']:.4f}")
