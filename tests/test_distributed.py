"""Distributed setups that do what they say: FSDP2 on CPU with packed batches, and launches that
would silently fall back (FSDP asked, DDP run) refused.

FSDP through accelerate or `TrainingArguments(fsdp=...)` on CPU runs DDP without a word (measured
with accelerate 1.16: `DistributedType.MULTI_CPU`, the model a `DistributedDataParallel`).
FSDP2's `fully_shard` works on CPU with gloo: 2 ranks, packed micro-batches, equal to padding.
"""

import sys
from pathlib import Path

import pytest
import torch

from packcollate import PaddedCollator

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer_integration import N_EXAMPLES, prompt_completion_dataset, tiny_model  # noqa: E402
from two_ranks import launch  # noqa: E402



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


def test_fsdp_asked_on_cpu_is_refused_not_run_as_ddp(tmp_path, free_port):
    """TrainingArguments(fsdp="full_shard") on 2 CPU ranks: accelerate would train with DDP; refused first."""
    result = launch("fsdp_asked_on_cpu.py", str(tmp_path), port=free_port)
    assert result.stdout.count("FSDP was asked for (TrainingArguments(fsdp=") == 2, result.stdout  # both ranks
    assert "but accelerate runs DistributedType.MULTI_CPU and would not shard the model" in result.stdout


def test_accelerate_launch_check_names_the_command():
    from accelerate import Accelerator

    from packcollate.integrations.preflight import assert_processes

    accelerator = Accelerator(cpu=True)
    assert_processes(accelerator, 1)
    with pytest.raises(RuntimeError, match=r"expected 2 processes, got 1: .*accelerate launch --multi_gpu --num_processes 2"):
        assert_processes(accelerator, 2)
