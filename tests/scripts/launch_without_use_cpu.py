"""Worker for integrations/test_preflight.py: PackedTrainer on 2 CPU ranks started by torchrun WITHOUT
`use_cpu=True`, the three ways a new user launches open-instruct-style: plain (`plain`), DeepSpeed ZeRO-2 with a
`train_batch_size` (`deepspeed`), DeepSpeed without one (`deepspeed-no-batch-size`).

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/launch_without_use_cpu.py TMP_DIR KIND

Measured before the check: two unsynchronised runs; `AssertionError: Check batch related parameters`; every rank
training all 16 examples alone. Prints `REFUSED: <message>` and exits 0 when `train()` refuses before the first step.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where `tests` is a package
from packcollate.integrations import PackedTrainer  # noqa: E402
from tests.helpers import arguments, prompt_completion_dataset, tiny_model  # noqa: E402
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402


def main(out_dir: str, kind: str) -> None:
    watchdog()
    options = {}
    if kind.startswith("deepspeed"):
        from tests.scripts.deepspeed_step import deepspeed_config, skip_shared_memory_kernel

        skip_shared_memory_kernel()
        options["deepspeed"] = deepspeed_config(2)
        if kind == "deepspeed-no-batch-size":
            del options["deepspeed"]["train_batch_size"]
    args = arguments(out_dir, use_cpu=False, ddp_backend="gloo", per_device_train_batch_size=4, **options)
    trainer = PackedTrainer(model=tiny_model(), args=args, train_dataset=prompt_completion_dataset(), check_packing=False)
    try:
        trainer.train()
    except RuntimeError as error:
        print("REFUSED:", error, f"(steps: {trainer.state.global_step})", flush=True)
        code = 0
    else:
        print(f"NOT REFUSED: trained {trainer.state.global_step} steps", flush=True)
        code = 1
    exit_now(code)  # no teardown: see two_ranks


if __name__ == "__main__":
    main(*sys.argv[1:3])
