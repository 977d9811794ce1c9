"""Padding-free GRPO (and RLOO) with TRL: generation is TRL's; the policy's training forward and backward,
and the reference / old-policy log-prob passes, run on packed rollouts (prompt + completion, no padding).

    python examples/trl_grpo.py --steps 10                            # GRPOConfig's default loss (dapo)
    python examples/trl_grpo.py --steps 10 --loss-type grpo --beta 0.04   # a KL term: a frozen reference copy
    python examples/trl_grpo.py --steps 10 --lora --beta 0.04             # LoRA: the reference is the adapters off
    python examples/trl_grpo.py --steps 10 --max-tokens 600               # token-budget pieces per micro-batch
    python examples/trl_grpo.py --steps 10 --rloo                         # PackedRLOOTrainer

A tiny random Llama learns nothing useful in 10 steps; the point is the wiring. The reward is rule-based:
1 for a completion that states the problem's answer, 0.1 for each digit (up to 0.5). The completions,
loss and every metric TRL logs are those TRL's padded trainer gives (tests/integrations/test_trl_rl.py).
"""

import argparse
import re
import tempfile

import datasets
from _common import tiny_model
from trl import GRPOConfig, RLOOConfig

from packcollate.integrations.trl import PackedGRPOTrainer, PackedRLOOTrainer
from packcollate.tools.toy import arithmetic_problems, char_tokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--prompts", type=int, default=64)
parser.add_argument("--loss-type", default="dapo", help="any GRPOConfig.loss_type: grpo, bnpo, dr_grpo, dapo, cispo, …")
parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient; > 0 uses a reference model")
parser.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft)")
parser.add_argument("--max-tokens", type=int, default=None, help="token budget of one packed forward")
parser.add_argument("--rloo", action="store_true", help="PackedRLOOTrainer instead of PackedGRPOTrainer")
parser.add_argument("--output-dir", default="/tmp/packcollate-trl-grpo")
args = parser.parse_args()


def answer_reward(completions, answer, **kwargs):
    """Rule-based: 1 if the completion states the answer, plus 0.1 per digit (at most 0.5)."""
    return [float(re.search(rf"\b{a}\b", c) is not None) + min(sum(ch.isdigit() for ch in c), 5) / 10
            for c, a in zip(completions, answer, strict=True)]


problems = arithmetic_problems(args.prompts, seed=0)
dataset = datasets.Dataset.from_list([{"prompt": p["prompt"], "answer": p["completion"].split()[-1].rstrip(".")}
                                      for p in problems])
model = tiny_model(attn_implementation="packcollate")
if args.beta and not args.lora:  # TRL builds the reference from the policy's path: save the tiny model there
    reference_dir = tempfile.mkdtemp(prefix="packcollate-grpo-reference-")
    model.save_pretrained(reference_dir)
    model.config._name_or_path = reference_dir
peft_config = None
if args.lora:
    from peft import LoraConfig

    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
config_cls, trainer_cls = (RLOOConfig, PackedRLOOTrainer) if args.rloo else (GRPOConfig, PackedGRPOTrainer)
options = {} if args.rloo else {"loss_type": args.loss_type}
trainer = trainer_cls(
    model=model,
    reward_funcs=answer_reward,
    args=config_cls(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=48, learning_rate=1e-3, beta=args.beta, logging_steps=max(1, args.steps // 5),
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, **options,
    ),
    train_dataset=dataset,
    processing_class=char_tokenizer(),
    peft_config=peft_config,
    max_tokens_per_batch=args.max_tokens,
)
result = trainer.train()
last = next(entry for entry in reversed(trainer.state.log_history) if "reward" in entry)
print(f"train loss {result.training_loss:.4f}, reward {last['reward']:.3f}, "
      f"mean completion length {last['completions/mean_length']:.1f}")
