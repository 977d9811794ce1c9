"""Supervised fine-tuning with the Hugging Face Trainer and packed batches.

    python examples/trainer_sft.py --steps 20 --max-tokens 4096

`PackedTrainer` is `Trainer` plus: `PackedCollator` by default, the `completion_mask` column kept
through `remove_unused_columns`, optional token-budget batches (`max_tokens_per_batch`), and a check
at train start that the attention backend keeps packed examples apart.
"""

import argparse

import datasets
from _common import arithmetic_features, tiny_model
from transformers import TrainingArguments

import packcollate  # noqa: F401  registers attn_implementation="packcollate"
from packcollate import PackedCollator
from packcollate.integrations import PackedTrainer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--examples", type=int, default=400)
parser.add_argument("--max-tokens", type=int, default=None, help="token budget per batch (default: 16 examples)")
parser.add_argument("--model", default=None, help="a local model folder (default: a tiny random Llama)")
parser.add_argument("--output-dir", default="/tmp/packcollate-trainer-sft")
args = parser.parse_args()

train = datasets.Dataset.from_list(arithmetic_features(args.examples))
validation = datasets.Dataset.from_list(arithmetic_features(64, offset=args.examples))

trainer = PackedTrainer(
    model=tiny_model(args.model),
    args=TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=16,
        per_device_eval_batch_size=16, learning_rate=1e-3, logging_steps=max(1, args.steps // 5),
        eval_strategy="steps", eval_steps=args.steps, save_strategy="no", report_to=[], use_cpu=True,
    ),
    train_dataset=train,
    eval_dataset=validation,
    data_collator=PackedCollator(max_seq_length=1024),  # bounds each example, on every split
    max_tokens_per_batch=args.max_tokens,
)
result = trainer.train()
metrics = trainer.evaluate()
print(f"train loss {result.training_loss:.4f}  eval loss {metrics['eval_loss']:.4f}")
