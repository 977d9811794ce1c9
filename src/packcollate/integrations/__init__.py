"""Integrations with training frameworks; nothing in the core imports from here.

- `PackedTrainer`, `PackingTrainerMixin`: Hugging Face `Trainer` (`packcollate.integrations.trainer`).
- `PackedSFTTrainer`, `PackedDPOTrainer`, `PackedRewardTrainer`, `PackedGRPOTrainer`, `PackedRLOOTrainer`:
  TRL (`packcollate.integrations.trl`, `trl_preference`, `trl_vision`, `trl_rl`; needs the `trl` extra).
- `PackingGuardCallback`: stops a `Trainer` run whose attention backend would mix packed examples
  (`callbacks`).
- The checks a trainer runs before its first step, each given the trainer (`preflight`): mask
  columns, split lengths, the launch.
- `count_label_tokens`, `micro_batches`: the token-mean loss in plain PyTorch / accelerate loops;
  `join_torchrun`: a torchrun process's group, rank and device
  (`packcollate.integrations.loops`).
- `prepare_sequence_parallel`, `shard_packed_batch`, `sequence_parallel_forward`,
  `sequence_parallel_loss`, `count_shard_targets`: one packed row split across a sequence-parallel
  process group in hand-written loops (Ulysses; `packcollate.integrations.sequence_parallel`).
"""

from .callbacks import PackingGuardCallback
from .loops import count_label_tokens, join_torchrun, micro_batches
from .sequence_parallel import (
    count_shard_targets,
    prepare_sequence_parallel,
    sequence_parallel_forward,
    sequence_parallel_loss,
    shard_packed_batch,
)
from .trainer import PackedTrainer, PackingTrainerMixin

__all__ = [
    "PackedTrainer",
    "PackingGuardCallback",
    "PackingTrainerMixin",
    "count_label_tokens",
    "join_torchrun",
    "count_shard_targets",
    "micro_batches",
    "prepare_sequence_parallel",
    "sequence_parallel_forward",
    "sequence_parallel_loss",
    "shard_packed_batch",
]


def __getattr__(name):
    if name == "PackedSFTTrainer":  # lazy: trl is an optional extra
        from .trl import PackedSFTTrainer

        return PackedSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
