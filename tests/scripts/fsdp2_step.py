"""Worker for integrations/test_distributed.py: one FSDP2 (`fully_shard`, gloo, CPU) step on packed batches, 2 ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/fsdp2_step.py OUT.pt

Each decoder layer and the whole model are sharded with `torch.distributed.fsdp.fully_shard`; each
rank packs its half of the 16 examples into two micro-batches. The step's loss is the padded token
mean: the model sums its token losses and divides by the label tokens of all micro-batches of all
ranks (`count_label_tokens`), and the loss is multiplied by the world size because FSDP averages
gradients over ranks. Rank 0 saves the loss and the full (unsharded) gradients.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where `tests` is a package
from packcollate import PackedCollator  # noqa: E402
from packcollate.integrations import count_label_tokens  # noqa: E402
from tests.helpers import N_EXAMPLES, prompt_completion_dataset, tiny_model  # noqa: E402
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402


def main(out: str) -> None:
    watchdog()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = tiny_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = sum(p.to_local().numel() for p in model.parameters())
    dataset = prompt_completion_dataset()
    rows = [{k: v for k, v in dataset[i].items() if k != "idx"} for i in range(N_EXAMPLES)]
    mine = rows[rank * N_EXAMPLES // world : (rank + 1) * N_EXAMPLES // world]
    collator = PackedCollator()
    micro = [collator(mine[: len(mine) // 3]), collator(mine[len(mine) // 3 :])]  # unequal micro-batches
    n_tokens = count_label_tokens(micro)  # both micro-batches, both ranks
    step_loss = torch.zeros(())
    for i, batch in enumerate(micro):
        model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter once, after the last
        loss = model(**batch, num_items_in_batch=n_tokens).loss
        (loss * world).backward()  # FSDP divides the gradients by the world size
        step_loss += loss.detach()
    dist.all_reduce(step_loss)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        total = sum(p.numel() for p in grads.values())
        torch.save({"loss": step_loss, "grads": grads, "sharded_fraction": sharded / total}, out)
    exit_now()  # no teardown: see two_ranks


if __name__ == "__main__":
    main(sys.argv[1])
