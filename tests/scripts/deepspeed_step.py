"""Worker for integrations/test_deepspeed.py: one PackedTrainer optimizer step under DeepSpeed ZeRO-2 or ZeRO-3
(DeepSpeed's CPU accelerator, gloo) on 2 ranks, packed micro-batches of 4 examples, 2 accumulated per rank: the 16
examples of `prompt_completion_dataset` in one step. Rank 0 saves every parameter's change (gathered under ZeRO-3).

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/deepspeed_step.py OUT.pt STAGE [LOSS_WEIGHTING]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where `tests` is a package
from packcollate.integrations import PackedTrainer  # noqa: E402
from tests.helpers import arguments, prompt_completion_dataset, tiny_model  # noqa: E402
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402


def deepspeed_config(stage: int) -> dict:
    """open-instruct's stage-2 / stage-3 accelerate configs, reduced to what a CPU run reads: every batch size from
    `TrainingArguments` ("auto"), the client optimizer (SGD) allowed."""
    return {
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": "auto", "stage3_gather_16bit_weights_on_model_save": True},
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "steps_per_print": 10**9,
    }


def parameters(trainer) -> dict:
    """{name: full fp32 tensor} of the trained model on every rank (ZeRO-3 gathers its shards)."""
    model = trainer.model
    if int(trainer.accelerator.state.deepspeed_plugin.zero_stage) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def skip_shared_memory_kernel() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce kernel (C++, minutes on 2 cores) the first time
    a process group starts; gloo does the same reduction, so the test runs without it."""
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # `deepspeed.comm.torch` is torch


def main(out: str, stage: str, loss_weighting: str = "token") -> None:
    watchdog(240)
    skip_shared_memory_kernel()
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # optim="sgd" (lr 1, no momentum): DeepSpeed's set-up replaces a client optimizer with the Trainer's own
    args = arguments(out + ".dir", ddp_backend="gloo", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     optim="sgd", deepspeed=deepspeed_config(int(stage)))
    trainer = PackedTrainer(model=model, args=args, train_dataset=prompt_completion_dataset(), check_packing=False,
                            loss_weighting=loss_weighting)
    trainer.train()
    assert trainer.state.global_step == 1, trainer.state.global_step
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    after = parameters(trainer)
    if trainer.args.process_index == 0:
        torch.save({n: after[n] - before[n] for n in before}, out)
    exit_now()  # no barrier and no teardown: see two_ranks


if __name__ == "__main__":
    main(*sys.argv[1:4])  # OUT.pt STAGE [LOSS_WEIGHTING]
