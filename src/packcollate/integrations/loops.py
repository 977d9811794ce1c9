"""The token-mean loss in plain PyTorch / accelerate loops (the `Trainer` does this by itself).

With padding-free batches the number of examples, and of label tokens, varies from micro-batch to
micro-batch. Averaging each micro-batch's mean loss would weigh a token of a short batch more than
a token of a long one; the padded loss is the mean over *all* label tokens of the optimizer step.
So: count the step's label tokens over its micro-batches and over the ranks, have the model sum
its token losses and divide by that count, and undo DDP's averaging of gradients over ranks:

    for step in micro_batches(loader, accumulation_steps):
        n = count_label_tokens(step)                            # all micro-batches, all ranks
        for batch in step:
            loss = model(**batch, num_items_in_batch=n).loss    # sum over tokens / n
            (loss * world_size).backward()                      # DDP averages over ranks
        optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch

from ..errors import check_positive_int
from ..layout import IGNORE_INDEX
from ..objectives.losses import sum_over_step


def count_label_tokens(batches: Iterable[dict], *, across_ranks: bool = True) -> torch.Tensor:
    """Label tokens (next-token targets) of `batches`, summed over ranks when `torch.distributed` runs.

    A target is a label other than -100 at positions `1 …` of a row (the model shifts labels: the
    first position of a row is never predicted). Returns a 0-d int64 tensor on the labels' device.
    """
    # numpy batches too (`return_tensors="np"`)
    counts = ((torch.as_tensor(batch["labels"])[..., 1:] != IGNORE_INDEX).sum() for batch in batches)
    return sum_over_step(counts, across_ranks=across_ranks, kind=" with 'labels'")


def micro_batches(loader: Iterable[dict], accumulation_steps: int) -> Iterator[list[dict]]:
    """Group `loader`'s batches into lists of `accumulation_steps` (one list per optimizer step;
    the last list may be shorter)."""
    check_positive_int("accumulation_steps", accumulation_steps)
    step: list[dict] = []
    for batch in loader:
        step.append(batch)
        if len(step) == accumulation_steps:
            yield step
            step = []
    if step:
        yield step


def join_torchrun(script: str) -> tuple[int, int, torch.device]:
    """This process of a `torchrun` launch: joins the process group (nccl on CUDA, gloo on CPU) and returns its
    rank, the world size and its device (`cuda:LOCAL_RANK`, made current, or the CPU). Outside torchrun, exits
    with the command that launches `script` on 2 processes."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise SystemExit(f"launch with torchrun: torchrun --nproc_per_node 2 {script}")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device
