"""DeepSpeed ZeRO-2 and ZeRO-3 with packed batches (`PackedTrainer(args=TrainingArguments(deepspeed=...))`), 2 ranks on
DeepSpeed's CPU accelerator with gloo: one optimizer step (4 packed examples a micro-batch, 2 accumulated per rank)
changes every parameter as the padded single-process step over the same 16 examples does — with the token-mean loss,
and with `loss_weighting="sum"` (open-instruct's `--reduce_loss sum`: summed token loss / (accumulation x world)).
"""

import pytest
import torch

from tests.helpers import assert_same_change, prompt_completion_dataset, summed_loss_change
from tests.scripts.two_ranks import launch

pytest.importorskip("deepspeed")
torch.set_num_threads(1)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_packed_equals_padded(stage, padded_reference, tmp_path, free_port):
    out = tmp_path / f"zero{stage}.pt"
    launch("deepspeed_step.py", str(out), str(stage), port=free_port)
    assert_same_change(padded_reference, torch.load(out))


def test_zero2_summed_loss_equals_open_instruct(tmp_path, free_port):
    out = tmp_path / "zero2_sum.pt"
    launch("deepspeed_step.py", str(out), "2", "sum", port=free_port)
    assert_same_change(summed_loss_change(prompt_completion_dataset(), divisor=2 * 2), torch.load(out))
