"""Sequence parallelism over packed rows: one row of long examples split across ranks, exact.

    torchrun --nproc_per_node 2 examples/sequence_parallel.py --steps 3     # gloo on CPU, NCCL on GPU

Every rank holds the same packed row (here: long examples, each a chain of arithmetic problems) and
keeps a contiguous shard of its tokens (`shard_packed_batch`: balanced, labels shifted over the
whole row first). The model runs on the shard; each attention layer exchanges heads for tokens
(Ulysses) and attends over the whole row with the packcollate backend, so no example sees another
and one cut by the shard edge is whole again. Each rank's loss is its share of the row's token mean
(`sequence_parallel_loss`); DDP averages the gradients, hence the multiplication by the world size.
Rank 0 also trains a copy of the model on the whole rows in one process and compares the losses;
the last line says whether they are equal.
"""

import argparse
import copy

import torch
import torch.distributed as dist
from _common import arithmetic_features, tiny_model
from torch.nn.parallel import DistributedDataParallel

from packcollate import PackedCollator
from packcollate.integrations import join_torchrun
from packcollate.integrations.sequence_parallel import (
    prepare_sequence_parallel,
    sequence_parallel_forward,
    sequence_parallel_loss,
    shard_packed_batch,
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=3, help="optimizer steps (one packed row each)")
parser.add_argument("--chain", type=int, default=6, help="arithmetic problems chained into one long example")
parser.add_argument("--examples-per-row", type=int, default=4)
args = parser.parse_args()

rank, world, device = join_torchrun("examples/sequence_parallel.py")


def long_examples(n: int, chain: int) -> list[dict]:
    """`n` long examples, each `chain` problems back to back (every completion trained on)."""
    problems = arithmetic_features(n * chain)
    return [{"input_ids": sum((p["input_ids"] for p in problems[i * chain:(i + 1) * chain]), []),
             "completion_mask": sum((p["completion_mask"] for p in problems[i * chain:(i + 1) * chain]), [])}
            for i in range(n)]


collator = PackedCollator()
examples = long_examples(args.steps * args.examples_per_row, args.chain)
rows = [collator(examples[i * args.examples_per_row:(i + 1) * args.examples_per_row]) for i in range(args.steps)]

model = tiny_model().to(device)
reference = copy.deepcopy(model) if rank == 0 else None  # one process, the whole row
prepare_sequence_parallel(model)  # refuses a model it cannot split, before any step
ddp = DistributedDataParallel(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3) if rank == 0 else None

worst = 0.0
for step, row in enumerate(rows, 1):
    row = {k: v.to(device) if torch.is_tensor(v) else v for k, v in row.items()}
    shard = shard_packed_batch(row)  # this rank's tokens of the row
    logits = sequence_parallel_forward(ddp, shard).logits  # (1, n_r, V)
    loss = sequence_parallel_loss(logits, shard)  # this rank's share of the row's token mean
    (loss * world).backward()  # DDP averages the gradients over the ranks
    optimizer.step()
    optimizer.zero_grad()
    row_loss = loss.detach().clone()
    dist.all_reduce(row_loss)  # the shares add up to the row's loss
    if rank == 0:
        one = reference(**row).loss
        one.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        one = one.detach()
        worst = max(worst, abs(float(row_loss) - float(one)) / abs(float(one)))
        print(f"step {step}: row of {row['input_ids'].shape[1]} tokens, {len(row['cu_seq_lens_q']) - 1} examples, "
              f"{world} ranks hold {shard['sequence_shard'].lengths} tokens: loss {float(row_loss):.6f} "
              f"(one process {float(one):.6f})", flush=True)

if rank == 0:
    equal = worst < 1e-5
    print(f"sequence-parallel loss equals one process: {'yes' if equal else 'no'} (max difference {worst:.1e}, relative)",
          flush=True)
dist.barrier()
dist.destroy_process_group()  # gloo may abort at exit when it is left alive
