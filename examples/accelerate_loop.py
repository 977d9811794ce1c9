"""A plain PyTorch + accelerate training loop with token-budget batches and the padded loss.

    python examples/accelerate_loop.py --steps 10
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --steps 10 --processes 2      # DDP (ddp_torchrun.sh)
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py --processes 2   # DDP, CPU too

On a machine without GPUs, `accelerate launch --num_processes 2` (no `--multi_gpu`) starts ONE
process; `--processes N` makes the script stop with the command to use instead of training alone.

The loss of an optimizer step is the mean over all its label tokens, across gradient-accumulation
micro-batches and ranks, exactly as with padding: `count_label_tokens` counts them, the model sums
its token losses and divides by that count (`num_items_in_batch`), and the loss is multiplied by
the number of processes because DDP averages gradients over ranks.
"""

import argparse
import contextlib

import torch
from _common import arithmetic_features, tiny_model
from accelerate import Accelerator
from torch.utils.data import DataLoader

import packcollate  # noqa: F401
from packcollate import PackedCollator, TokenBudgetBatchSampler
from packcollate.integrations import count_label_tokens, micro_batches
from packcollate.integrations.preflight import assert_processes

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
parser.add_argument("--examples", type=int, default=400)
parser.add_argument("--max-tokens", type=int, default=2048, help="token budget of one micro-batch on one rank")
parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
parser.add_argument("--processes", type=int, default=None, help="stop unless this many processes run")
args = parser.parse_args()

accelerator = Accelerator(cpu=not torch.cuda.is_available())
assert_processes(accelerator, args.processes)
features = arithmetic_features(args.examples)
sampler = TokenBudgetBatchSampler([len(f["input_ids"]) for f in features], args.max_tokens,
                                  num_replicas=accelerator.num_processes, rank=accelerator.process_index)
# the sampler already hands each rank its own batches: keep accelerate from sharding them again
loader = DataLoader(features, batch_sampler=sampler, collate_fn=PackedCollator(max_seq_length=args.max_tokens))
model = tiny_model()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, optimizer = accelerator.prepare(model, optimizer)

step, epoch = 0, 0
while step < args.steps:
    sampler.set_epoch(epoch)
    for micro in micro_batches(loader, args.accumulation):
        micro = [{k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro]
        n_tokens = count_label_tokens(micro)  # all micro-batches of the step, all ranks
        step_loss = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):  # sync gradients once
                loss = model(**batch, num_items_in_batch=n_tokens).loss  # this micro-batch's share
                accelerator.backward(loss * accelerator.num_processes)  # DDP divides by it again
            step_loss += loss.detach()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        step_loss = accelerator.reduce(step_loss, reduction="sum")  # token-mean loss of the whole step
        if accelerator.is_main_process:
            print(f"step {step}: loss {float(step_loss):.4f} over {int(n_tokens)} label tokens, "
                  f"{len(micro)} micro-batches x {accelerator.num_processes} process(es)")
        if step >= args.steps:
            break
    epoch += 1

accelerator.wait_for_everyone()
accelerator.end_training()  # destroys the process group: gloo aborts at exit when it is left alive
