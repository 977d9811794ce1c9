"""Worker for integrations/test_sequence_parallel.py: one trainer step under DeepSpeed's Ulysses, 2 ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ulysses_trainer_step.py OUT.pt [trainer]

`trainer`: `packed` (default: `PackedTrainer` and `TrainingArguments`) or `sft` (`PackedSFTTrainer`
and TRL's `SFTConfig` defaults, gradient checkpointing included, but fp32), on the tiny Llama and the
prompt/completion dataset (TRL turns its `completion_mask` into `labels`). Either with
`deepspeed=ZeRO-2`, `parallelism_config=ParallelismConfig(sp_backend="deepspeed", sp_size=2)`,
`per_device_train_batch_size=1` and `max_tokens_per_batch=128` (packcollate backend, gloo, CPU), one step: DeepSpeed's loader gives the group rank 0's first row, split in two.
The optimizer is SGD with learning rate LR, so each parameter's change over -LR is the gradient the step
applied, after DeepSpeed reduced the ranks' gradients (however the installed transformers and DeepSpeed
split and reduce the loss). Rank 0 saves that row (as its collator made it), the step's logged loss and
those applied gradients; the test computes them in one process.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.parallelism_config import ParallelismConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where `tests` is a package
from packcollate import PackedCollator  # noqa: E402
from packcollate.integrations import PackedTrainer  # noqa: E402
from tests.helpers import (  # noqa: E402
    arguments,
    char_tokenizer,
    prompt_completion_dataset,
    tiny_model,
)
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402

ROWS = []
LR = 1000.0  # large: each change stands well above the float32 rounding of the parameter it is added to
DEEPSPEED = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}


@dataclass(kw_only=True)
class RecordingCollator(PackedCollator):
    """`PackedCollator` that keeps the rows it makes (this rank's)."""

    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        ROWS.append({key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in batch.items()})
        return batch


def packed_trainer(out: str, model):
    args = arguments(f"{out}.run", deepspeed=DEEPSPEED, per_device_train_batch_size=1, optim="sgd", learning_rate=LR,
                     parallelism_config=ParallelismConfig(sp_backend="deepspeed", sp_size=2))
    return PackedTrainer(model=model, args=args, train_dataset=prompt_completion_dataset(), max_tokens_per_batch=128,
                         data_collator=RecordingCollator())


def sft_trainer(out: str, model):
    """`PackedSFTTrainer` with TRL's `SFTConfig` defaults (gradient checkpointing on) but fp32 and one SGD step."""
    from trl import SFTConfig

    from packcollate.integrations.trl import PackedSFTTrainer

    args = SFTConfig(f"{out}.run", max_steps=1, per_device_train_batch_size=1, learning_rate=LR, max_grad_norm=0.0,
                     optim="sgd",
                     lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     bf16=False, seed=0, shuffle_dataset=False, max_length=None, deepspeed=DEEPSPEED,
                     parallelism_config=ParallelismConfig(sp_backend="deepspeed", sp_size=2))
    assert args.gradient_checkpointing  # SFTConfig's default: recomputed Ulysses attention in the backward
    return PackedSFTTrainer(model=model, args=args, train_dataset=prompt_completion_dataset(),
                            processing_class=char_tokenizer(), max_tokens_per_batch=128,
                            data_collator=RecordingCollator())


TRAINERS = {"packed": packed_trainer, "sft": sft_trainer}


def main(out: str, kind: str = "packed") -> None:
    watchdog(200)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = TRAINERS[kind](out, model)
    trainer.train()
    grads = {name: (before[name] - p.detach()) / LR for name, p in model.named_parameters()}  # the applied gradient
    if dist.get_rank() == 0:
        loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]
        torch.save({"row": ROWS[0], "loss": loss, "grads": grads}, out)
    exit_now()


if __name__ == "__main__":
    main(*sys.argv[1:])
