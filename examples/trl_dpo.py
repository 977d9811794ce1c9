"""Padding-free DPO with TRL: chosen and rejected of every pair packed into one row.

    python examples/trl_dpo.py --steps 20                       # full fine-tuning, a frozen reference copy
    python examples/trl_dpo.py --steps 20 --lora                # LoRA: the reference is the adapters off
    python examples/trl_dpo.py --steps 20 --max-tokens 4096     # token-budget batches instead of 8 pairs
    python examples/trl_dpo.py --steps 20 --loss-type ipo

TRL prepares the pairs (prompt extraction, EOS, tokenization); `PackedDPOTrainer` packs each batch
into one row of 2B sequences and runs the policy and reference forwards on it. Loss, rewards and
metrics are TRL's own (`rewards/margins`, `rewards/accuracies`, `logps/chosen`, …).
"""

import argparse

import datasets
from _common import arithmetic_preferences, tiny_model
from trl import DPOConfig

import packcollate  # noqa: F401
from packcollate.integrations.trl import PackedDPOTrainer
from packcollate.tools.toy import char_tokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--examples", type=int, default=200)
parser.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft)")
parser.add_argument("--max-tokens", type=int, default=None,
                    help="token budget per micro-batch (both sequences of a pair)")
parser.add_argument("--loss-type", default="sigmoid", help="any DPOConfig.loss_type: sigmoid, ipo, hinge, …")
parser.add_argument("--output-dir", default="/tmp/packcollate-trl-dpo")
args = parser.parse_args()

peft_config = None
if args.lora:
    from peft import LoraConfig

    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
trainer = PackedDPOTrainer(
    model=tiny_model(),
    ref_model=None if args.lora else tiny_model(),  # no hub: the reference is a local copy
    args=DPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-3,
        loss_type=[args.loss_type], logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[],
        use_cpu=True, max_length=512,
    ),
    train_dataset=datasets.Dataset.from_list(arithmetic_preferences(args.examples)),
    processing_class=char_tokenizer(),
    peft_config=peft_config,
    max_tokens_per_batch=args.max_tokens,
    check_packing=not args.lora,  # the packing guard does not unwrap PEFT models yet
)
result = trainer.train()
last = next(entry for entry in reversed(trainer.state.log_history) if "rewards/margins" in entry)
print(f"train loss {result.training_loss:.4f}, reward margin {last['rewards/margins']:.4f}, "
      f"reward accuracy {last['rewards/accuracies']:.2f}")
