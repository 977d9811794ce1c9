"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with packed, token-budget batches, on CPU or GPU.

    torchrun --nproc_per_node 2 examples/fsdp2_loop.py --steps 10      # gloo on CPU, NCCL on GPU

accelerate's FSDP (`accelerate launch --use_fsdp`, `TrainingArguments(fsdp=...)`) runs DDP on a
machine without GPUs (measured, accelerate 1.16); `fully_shard` itself shards on CPU too. Every
decoder layer and then the whole model are sharded; each rank keeps only its part of the weights.
The loss is the padded token mean: `count_label_tokens` counts the step's targets on all
micro-batches and ranks, the model divides its summed token loss by that count, and the loss is
multiplied by the world size because FSDP averages gradients over ranks.
"""

import argparse

import torch
import torch.distributed as dist
from _common import arithmetic_features, tiny_model
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

import packcollate  # noqa: F401
from packcollate import PackedCollator, TokenBudgetBatchSampler
from packcollate.integrations import count_label_tokens, join_torchrun, micro_batches

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
parser.add_argument("--examples", type=int, default=400)
parser.add_argument("--max-tokens", type=int, default=2048, help="token budget of one micro-batch on one rank")
parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
args = parser.parse_args()

rank, world, device = join_torchrun("examples/fsdp2_loop.py")

model = tiny_model().to(device)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

features = arithmetic_features(args.examples)
sampler = TokenBudgetBatchSampler([len(f["input_ids"]) for f in features], args.max_tokens,
                                  num_replicas=world, rank=rank)
loader = DataLoader(features, batch_sampler=sampler, collate_fn=PackedCollator(max_seq_length=args.max_tokens))

step, epoch = 0, 0
while step < args.steps:
    sampler.set_epoch(epoch)
    for micro in micro_batches(loader, args.accumulation):
        micro = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro]
        n_tokens = count_label_tokens(micro)  # all micro-batches of the step, all ranks
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter once per step
            loss = model(**batch, num_items_in_batch=n_tokens).loss
            (loss * world).backward()
            step_loss += loss.detach()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        dist.all_reduce(step_loss)  # token-mean loss of the whole step
        if rank == 0:
            local = sum(p.to_local().numel() for p in model.parameters())
            total = sum(p.numel() for p in model.parameters())
            print(f"step {step}: loss {float(step_loss):.4f} over {int(n_tokens)} label tokens, {world} ranks, "
                  f"FSDP2: rank 0 holds {local}/{total} parameters", flush=True)
        if step >= args.steps:
            break
    epoch += 1

dist.barrier()
dist.destroy_process_group()  # gloo may abort at exit when it is left alive
