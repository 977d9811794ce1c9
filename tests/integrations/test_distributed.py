"""FSDP2 on CPU with packed batches: `torch.distributed.fsdp.fully_shard` with gloo on 2 ranks, packed
micro-batches and `count_label_tokens`, equal to padding (loss and gradients).

FSDP through accelerate or `TrainingArguments(fsdp=...)` on CPU runs DDP without a word (measured
with accelerate 1.16: `DistributedType.MULTI_CPU`, the model a `DistributedDataParallel`); that launch
is refused (test_preflight.py).
"""

import torch

from packcollate import PaddedCollator
from tests.helpers import N_EXAMPLES, prompt_completion_dataset, tiny_model
from tests.scripts.two_ranks import launch


def padded_loss_and_grads():
    """All 16 examples in one padded batch: the token-mean loss and its gradients."""
    torch.set_num_threads(1)
    model = tiny_model("sdpa")
    dataset = prompt_completion_dataset()
    batch = PaddedCollator()([{k: v for k, v in dataset[i].items() if k != "idx"} for i in range(N_EXAMPLES)])
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_fsdp2_fully_shard_two_ranks_packed_equals_padded(tmp_path, free_port):
    out = tmp_path / "fsdp2.pt"
    launch("fsdp2_step.py", str(out), port=free_port)
    saved = torch.load(out)
    assert saved["sharded_fraction"] < 0.6  # each rank holds about half of the parameters: really sharded
    loss, grads = padded_loss_and_grads()
    assert abs(float(saved["loss"]) - float(loss)) < 1e-5 * abs(float(loss))
    for name, grad in grads.items():
        assert float((saved["grads"][name] - grad).norm() / grad.norm().clamp_min(1e-12)) < 1e-5, name
