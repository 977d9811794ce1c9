"""Supervised fine-tuning with TRL's SFTTrainer, TRL's data preparation and packcollate's batches.

    python examples/trl_sft.py --steps 20            # prompt/completion: the prompt is not trained on
    python examples/trl_sft.py --steps 20 --packing  # TRL's BFD-packed rows (seq_lengths)

TRL prepares the dataset as usual; `PackedSFTTrainer` collates with `PackedCollator`, which packs
padding-free whether `padding_free` in `SFTConfig` is on or off.
"""

import argparse

import datasets
from _common import tiny_model
from trl import SFTConfig

import packcollate  # noqa: F401
from packcollate.integrations.trl import PackedSFTTrainer
from packcollate.tools.toy import char_tokenizer, load_arithmetic

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--examples", type=int, default=400)
parser.add_argument("--packing", action="store_true", help="TRL's BFD packing into rows of 1024 tokens")
parser.add_argument("--output-dir", default="/tmp/packcollate-trl-sft")
args = parser.parse_args()

problems = datasets.Dataset.from_list(load_arithmetic()[: args.examples])  # {"prompt", "completion"} strings
trainer = PackedSFTTrainer(
    model=tiny_model(),
    args=SFTConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=2 if args.packing else 16,
        learning_rate=1e-3, logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[], use_cpu=True,
        packing=args.packing, max_length=1024 if args.packing else None,
    ),
    train_dataset=problems,
    processing_class=char_tokenizer(),
)
result = trainer.train()
print(f"train loss {result.training_loss:.4f}")
