"""Worker for integrations/test_preflight.py: PackedTrainer with TrainingArguments(fsdp="full_shard") on 2 CPU ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/fsdp_asked_on_cpu.py TMP_DIR

accelerate would train with DDP; PackedTrainer must refuse. Prints the error and exits 0 when refused.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where `tests` is a package
from packcollate.integrations import PackedTrainer  # noqa: E402
from tests.helpers import arguments, prompt_completion_dataset, tiny_model  # noqa: E402
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402


def main(out_dir: str) -> None:
    watchdog()
    args = arguments(out_dir, fsdp="full_shard", ddp_backend="gloo")
    try:
        PackedTrainer(model=tiny_model(), args=args, train_dataset=prompt_completion_dataset(), check_packing=False)
    except RuntimeError as error:
        print("REFUSED:", error, flush=True)
        code = 0
    else:
        print("NOT REFUSED", flush=True)
        code = 1
    exit_now(code)  # no teardown: see two_ranks


if __name__ == "__main__":
    main(sys.argv[1])
