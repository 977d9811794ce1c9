"""Data-parallel ranks and resume states: what the sampler and the stream share about them.

`TokenBudgetBatchSampler` and `TokenBudgetStream` both compute the plan of every rank in every
process and keep their own rank's batches, and both resume mid-pass from a state dict:

- `distributed_default(num_replicas, rank)`: `(num_replicas, rank)` checked, each defaulting to
  the world size and rank of `torch.distributed` when it is initialised, else to 1 and 0;
- `check_state_keys(state, keys, num_replicas)`: a resume state carries the keys it needs and was
  saved with this plan's `num_replicas` (the plan depends on it).
"""

from __future__ import annotations

import torch

from ..errors import InputError, check_positive_int, is_int


def distributed_default(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """`(num_replicas, rank)`, None taken from `torch.distributed` (1 and 0 when it is not initialised).

    Raises InputError (a ValueError) unless `num_replicas` is a positive int and `rank` an int in
    `[0, num_replicas)`.
    """
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialized else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    num_replicas = check_positive_int("num_replicas", num_replicas)
    if not is_int(rank) or not 0 <= rank < num_replicas:
        raise InputError(f"rank: expected an int in [0, num_replicas={num_replicas}), got {rank!r}")
    return num_replicas, int(rank)


def check_state_keys(state: dict, keys: tuple[str, ...], num_replicas: int) -> None:
    """A resume state carries `keys` and, when it names one, this plan's `num_replicas` (the plan
    depends on it); InputError (a ValueError) otherwise."""
    if set(keys) - set(state):
        raise InputError(f"state: expected the keys {', '.join(keys)}, got {sorted(state)}")
    if state.get("num_replicas", num_replicas) != num_replicas:
        raise InputError(
            f"state: expected num_replicas={num_replicas} (the plan depends on it), "
            f"got a state saved with {state['num_replicas']}"
        )
