"""`loss_weighting="sequence"` (`packcollate.integrations.sequence_loss`): every example weighs the same in
`PackedTrainer` with gradient accumulation and a token budget, over 2 ranks (torchrun, gloo, CPU), and in
`PackedSFTTrainer`; the packed loss and gradients equal the padded reference, the mean over examples of each
example's mean token loss. A bad weighting is named. The loss itself: objectives/test_losses.py.
"""

import pytest
import torch

from packcollate.integrations import PackedTrainer
from tests.helpers import (
    arguments,
    padded_reference_change,
    prompt_completion_dataset,
    tiny_model,
)
from tests.helpers import assert_same_change_within_an_ulp as assert_same_change
from tests.scripts.two_ranks import launch

torch.set_num_threads(1)


def test_trainer_accumulation_and_budget_equal_padded(tmp_path):
    dataset = prompt_completion_dataset()
    expected, _ = padded_reference_change(dataset)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = sum(len(x) for x in dataset["input_ids"])
    args = arguments(tmp_path, max_steps=-1, num_train_epochs=1, gradient_accumulation_steps=8)
    trainer = PackedTrainer(model=model, args=args, train_dataset=dataset, max_tokens_per_batch=total // 4 + 40,
                            optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None), check_packing=False,
                            loss_weighting="sequence")
    trainer.train()
    assert trainer.state.global_step == 1
    assert_same_change(expected, {n: p.detach() - before[n] for n, p in model.named_parameters()})


def test_two_ranks_with_torchrun_equal_padded(tmp_path, free_port):
    dataset = prompt_completion_dataset()
    expected, _ = padded_reference_change(dataset)
    out = tmp_path / "change.pt"
    launch("ddp_trainer_step.py", str(out), "--loss-weighting", "sequence", port=free_port)
    assert_same_change(expected, torch.load(out))


def test_bad_loss_weighting_is_named(tmp_path):
    with pytest.raises(ValueError, match="loss_weighting: expected one of \\('token', 'sequence'\\), got 'example'"):
        PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=prompt_completion_dataset(),
                      loss_weighting="example")


def test_sft_trainer_sequence_weighting(tmp_path):
    """PackedSFTTrainer(loss_weighting="sequence"): the first step's loss is the mean over its
    examples of each one's mean completion loss (TRL's prompt/completion preparation)."""
    pytest.importorskip("trl")
    from packcollate.integrations.trl import PackedSFTTrainer
    from packcollate.tools.toy import char_tokenizer
    from tests.helpers import prompt_completion
    from tests.helpers import tiny_chat_model as tiny_causal_lm
    from tests.helpers import trl_config as config

    trainer = PackedSFTTrainer(model=tiny_causal_lm(),
                               args=config(tmp_path, per_device_train_batch_size=8, max_steps=1),
                               train_dataset=prompt_completion(8), processing_class=char_tokenizer(),
                               loss_weighting="sequence")
    reference = tiny_causal_lm()
    with torch.no_grad():
        losses = []
        for row in trainer.train_dataset:
            ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])  # TRL masks the prompt
            losses.append(reference(input_ids=ids[None], labels=labels[None]).loss)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4)
