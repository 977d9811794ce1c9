"""Worker for integrations/test_sequence_parallel.py: one packed row split across a sequence-parallel group.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/sequence_parallel_step.py OUT.pt [--dp 2]

For each case of `CASES` (tiny Llama / Qwen2 configs, fp32, random weights) every rank of a group of
`world / dp` ranks shards the same packed row (`shard_packed_batch`), runs the model on its shard
(`sequence_parallel_forward`), takes its loss share (`sequence_parallel_loss`) and backward; the
gradients are then summed over the world (each rank computed part of them), the shares summed
into the loss, and the logits gathered into the row. With `--dp 2` the world holds two groups, each
its own row (data parallel x sequence parallel), and the counts span both rows; then the 4 ranks split
one row as one group (`llama_gqa`: 2 K/V heads over 4 ranks, each repeated). Rank 0 saves
everything; the test computes the same in one process.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where `tests` is a package
from packcollate.integrations.sequence_parallel import (  # noqa: E402
    count_shard_targets,
    prepare_sequence_parallel,
    sequence_parallel_forward,
    sequence_parallel_loss,
    shard_packed_batch,
)
from tests.helpers import sequence_parallel_case  # noqa: E402
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402

CASES = ("llama_gqa", "llama_mqa", "qwen2_sequence", "llama_checkpointed")


def gather_row(local: torch.Tensor, shard, group) -> torch.Tensor:
    """The `(1, n_r, ...)` shards of one row, concatenated in rank order on every rank."""
    width = max(shard.lengths)
    padded = torch.zeros((1, width, *local.shape[2:]), dtype=local.dtype)
    padded[:, : local.shape[1]] = local
    parts = [torch.empty_like(padded) for _ in range(shard.size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:, :n] for part, n in zip(parts, shard.lengths)], dim=1)


def main(out: str, dp: int) -> None:
    watchdog()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    size = world // dp
    groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(dp)]
    row = rank // size
    group = groups[row]
    saved = {}
    for case in CASES:
        model, rows, weighting = sequence_parallel_case(case)
        batch = rows[row % len(rows)]
        prepare_sequence_parallel(model, group)
        if case.endswith("checkpointed"):
            model.gradient_checkpointing_enable()
        model.train()
        shard = shard_packed_batch(batch, group)
        n = count_shard_targets([shard], loss_weighting=weighting) if dp > 1 else None
        logits = sequence_parallel_forward(model, shard).logits
        loss = sequence_parallel_loss(logits, shard, loss_weighting=weighting, num_items_in_batch=n)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)  # the shares of every rank add up to the loss
        for p in model.parameters():
            dist.all_reduce(p.grad)  # each rank computed part of every gradient
        saved[case] = {"loss": total, "logits": gather_row(logits.detach(), shard["sequence_shard"], group),
                       "grads": {name: p.grad for name, p in model.named_parameters()}}
    if dp > 1:  # and the whole world as one group of 4: 2 K/V heads repeated to one per rank
        model, rows, weighting = sequence_parallel_case("llama_gqa")
        prepare_sequence_parallel(model, None)
        shard = shard_packed_batch(rows[0], None)
        logits = sequence_parallel_forward(model, shard).logits
        loss = sequence_parallel_loss(logits, shard, loss_weighting=weighting)
        loss.backward()
        dist.all_reduce(total := loss.detach().clone())
        for p in model.parameters():
            dist.all_reduce(p.grad)
        saved["llama_gqa_world"] = {"loss": total, "logits": gather_row(logits.detach(), shard["sequence_shard"], None),
                                    "grads": {name: p.grad for name, p in model.named_parameters()}}
    if rank == 0:
        torch.save(saved, out)
    exit_now()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--dp" else 1)
