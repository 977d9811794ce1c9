"""Worker for integrations/test_streams.py: a stream that ends unevenly over 2 ranks, then PackedTrainer on a stream.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_stream_step.py OUT.pt

1. `TokenBudgetStream` over 17 examples with budget 1 example per batch (`max_examples=1`): 17
   batches for 2 ranks. Every batch is followed by an all_reduce, as DDP's backward is: ranks with
   different step counts would hang. The examples each rank saw are gathered.
2. `PackedTrainer` on `to_iterable_dataset()`, token budget, one accumulated step: weight change saved.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, where `tests` is a package
from packcollate.batching.stream import TokenBudgetStream  # noqa: E402
from packcollate.integrations import PackedTrainer  # noqa: E402
from tests.helpers import arguments, prompt_completion_dataset, tiny_model  # noqa: E402
from tests.scripts.two_ranks import exit_now, watchdog  # noqa: E402


def main(out: str) -> None:
    watchdog()
    dataset = prompt_completion_dataset()
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = sum(len(x) for x in dataset["input_ids"])
    # the Trainer steps on a stream only after gradient_accumulation_steps batches: make them the whole stream
    n_batches = len(list(TokenBudgetStream(dataset.to_iterable_dataset(), total // 4 + 40, num_replicas=2, rank=0)))
    args = arguments(out + ".dir", ddp_backend="gloo", per_device_train_batch_size=4,
                     gradient_accumulation_steps=n_batches, max_steps=1)
    trainer = PackedTrainer(model=model, args=args, train_dataset=dataset.to_iterable_dataset(),
                            max_tokens_per_batch=total // 4 + 40, check_packing=False,
                            optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None))
    trainer.train()
    assert trainer.state.global_step == 1, trainer.state.global_step

    uneven = prompt_completion_dataset(n=17).to_iterable_dataset()
    stream = TokenBudgetStream(uneven, None, max_examples=1, buffer_size=4)
    seen, steps = [], 0
    for batch in stream:
        dist.all_reduce(torch.ones(1))  # every rank must reach it as often as the others
        steps += 1
        seen += [row["idx"] for row in batch if any(label != -100 for label in row.get("labels", [0]))]
    gathered = [None, None]
    dist.all_gather_object(gathered, (seen, steps))
    if dist.get_rank() == 0:
        torch.save({"change": {n: p.detach() - before[n] for n, p in model.named_parameters()},
                    "seen": sorted(i for s, _ in gathered for i in s), "steps": [n for _, n in gathered],
                    "padding_batches": stream.padding_batches}, out)
    exit_now()  # no teardown: see two_ranks


if __name__ == "__main__":
    main(sys.argv[1])
