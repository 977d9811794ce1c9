"""Worker for integrations/test_sequence_parallel.py: one `PackedTrainer` step under DeepSpeed's Ulysses, 2 ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ulysses_trainer_step.py OUT.pt

`TrainingArguments(deepspeed=ZeRO-2, parallelism_config=ParallelismConfig(sp_backend="deepspeed",
sp_size=2), per_device_train_batch_size=1)` with `max_tokens_per_batch=128` on the tiny Llama
(packcollate backend, gloo, CPU), one step: DeepSpeed's loader gives the group rank 0's first row,
split in two. Each rank keeps the gradient its backward gives every parameter (a tensor hook, before
DeepSpeed reduces them); their sum over the ranks divided by the world size is what ZeRO averages.
Rank 0 saves that row (as its collator made it), the step's logged loss and those gradients; the
test computes them in one process.
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
from tests.helpers import arguments, prompt_completion_dataset, tiny_model  # noqa: E402
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402

ROWS = []


@dataclass(kw_only=True)
class RecordingCollator(PackedCollator):
    """`PackedCollator` that keeps the rows it makes (this rank's)."""

    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        ROWS.append({key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in batch.items()})
        return batch


def keep_gradients(model) -> dict:
    """{name: the gradient of the first backward on this rank}, filled by tensor hooks."""
    grads = {}
    for name, p in model.named_parameters():
        p.register_hook(lambda grad, name=name: grads.setdefault(name, grad.detach().clone()))
    return grads


def main(out: str) -> None:
    watchdog(200)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = tiny_model()
    grads = keep_gradients(model)
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}
    args = arguments(f"{out}.run", deepspeed=config, per_device_train_batch_size=1,
                     parallelism_config=ParallelismConfig(sp_backend="deepspeed", sp_size=2))
    trainer = PackedTrainer(model=model, args=args, train_dataset=prompt_completion_dataset(), max_tokens_per_batch=128,
                            data_collator=RecordingCollator())
    trainer.train()
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    if dist.get_rank() == 0:
        loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]
        torch.save({"row": ROWS[0], "loss": loss, "grads": grads}, out)
    exit_now()


if __name__ == "__main__":
    main(sys.argv[1])
