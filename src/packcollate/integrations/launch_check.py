"""Refuse distributed launches that would silently run something else than what was asked.

Measured with accelerate 1.16, torch 2.13, on CPU:

- `accelerate launch --num_processes 2 script.py` starts one process (no GPU, no `--multi_gpu`);
  `accelerate launch --multi_gpu --num_processes 2 script.py` or `torchrun --nproc_per_node 2
  script.py` start two (gloo on CPU);
- `accelerate launch --use_fsdp …` and `TrainingArguments(fsdp=…)` run DDP (`MULTI_CPU`, the model a
  `DistributedDataParallel`): accelerate's FSDP plugin is only used on accelerators. FSDP2's own
  `torch.distributed.fsdp.fully_shard` works on CPU with gloo (`examples/fsdp2_loop.py`).
"""

from __future__ import annotations

import os


def _fsdp_asked(args) -> str | None:
    """How FSDP was asked for: `TrainingArguments(fsdp=…)` or `accelerate launch --use_fsdp`; None if not."""
    options = getattr(args, "fsdp", None)
    if options:  # True in transformers 5.2x (options moved to fsdp_config), a list of FSDPOption before
        shown = options if isinstance(options, bool) else [str(getattr(o, "value", o)) for o in options]
        return f"TrainingArguments(fsdp={shown})"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "accelerate launch --use_fsdp"
    return None


def assert_fsdp_active(args, accelerator) -> None:
    """Raise RuntimeError when FSDP was asked for but accelerate will not shard the model."""
    asked = _fsdp_asked(args)
    if asked is None or getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return
    raise RuntimeError(
        f"FSDP was asked for ({asked}) but accelerate runs {accelerator.distributed_type} and would not shard the "
        f"model (accelerate's FSDP needs an accelerator; on CPU it silently trains with DDP). On CPU, shard with "
        f"FSDP2 in a plain loop: torchrun --nproc_per_node 2 examples/fsdp2_loop.py; or remove fsdp to train with DDP"
    )


def assert_processes(accelerator, expected: int | None) -> None:
    """Raise RuntimeError when `expected` processes were asked for and another number runs."""
    if expected is not None and accelerator.num_processes != expected:
        raise RuntimeError(
            f"expected {expected} processes, got {accelerator.num_processes}: on a machine without GPUs "
            f"`accelerate launch --num_processes {expected}` starts one; use "
            f"`accelerate launch --multi_gpu --num_processes {expected}` or `torchrun --nproc_per_node {expected}`"
        )
