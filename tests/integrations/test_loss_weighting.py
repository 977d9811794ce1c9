"""`loss_weighting` (`packcollate.integrations.loss_weighting`): with `"sequence"` every example weighs the same in
`PackedTrainer` with gradient accumulation and a token budget, over 2 ranks (torchrun, gloo, CPU), and in
`PackedSFTTrainer`; the packed loss and gradients equal the padded reference, the mean over examples of each
example's mean token loss. With `"sum"` (open-instruct's `--reduce_loss sum`) a step equals open-instruct's own loop
(accelerate's `accumulate`, summed cross-entropy, `accelerator.backward`) and the summed token loss / (accumulation x
ranks) on 2 ranks, whatever the batching. A bad weighting is named. The losses themselves: objectives/test_losses.py.
"""

import pytest
import torch

from packcollate import PaddedCollator
from packcollate.integrations import PackedTrainer
from tests.helpers import (
    arguments,
    padded_reference_change,
    prompt_completion_dataset,
    summed_loss_change,
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


def open_instruct_sum_change(dataset, batch_size: int, accumulation: int) -> dict:
    """open-instruct's `finetune.py` with `--reduce_loss sum`, one process: padded batches, `accelerator.accumulate`,
    the summed shifted cross-entropy, `accelerator.backward` (which divides by the accumulation steps); SGD(lr=1)."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    model = tiny_model("eager")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"input_ids": i, "completion_mask": m} for i, m in zip(dataset["input_ids"], dataset["completion_mask"])]
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=PaddedCollator())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])
            shift_labels = batch["labels"][..., 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, reduction="sum")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return {n: p.detach() - before[n] for n, p in accelerator.unwrap_model(model).named_parameters()}


@pytest.mark.parametrize("budget", [False, True])
def test_summed_loss_equals_open_instruct_loop(tmp_path, budget):
    """4 padded batches of 4 accumulated (open-instruct) == 4 packed micro-batches of 4, or token-budget batches
    (fewer micro-batches, the same examples): the sum divides by the configured accumulation, never by a count."""
    dataset = prompt_completion_dataset()
    expected = open_instruct_sum_change(dataset, batch_size=4, accumulation=4)
    assert_same_change(summed_loss_change(dataset, divisor=4), expected)  # the definition, one example at a time
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = sum(len(x) for x in dataset["input_ids"])
    args = arguments(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=4, max_steps=-1,
                     num_train_epochs=1)
    trainer = PackedTrainer(model=model, args=args, train_dataset=dataset, check_packing=False, loss_weighting="sum",
                            max_tokens_per_batch=total // 3 + 40 if budget else None,
                            optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None))
    trainer.train()
    assert trainer.state.global_step == 1
    assert_same_change(expected, {n: p.detach() - before[n] for n, p in model.named_parameters()})


def test_two_ranks_summed_loss_divides_by_accumulation_and_ranks(tmp_path, free_port):
    out = tmp_path / "change.pt"
    launch("ddp_trainer_step.py", str(out), "--loss-weighting", "sum", port=free_port)
    assert_same_change(summed_loss_change(prompt_completion_dataset(), divisor=8 * 2), torch.load(out))


def test_bad_loss_weighting_is_named(tmp_path):
    with pytest.raises(ValueError, match="loss_weighting: expected one of \\('token', 'sequence', 'sum'\\), got 'example'"):
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


def test_sft_trainer_summed_loss(tmp_path):
    """PackedSFTTrainer(loss_weighting="sum"): the first step's loss is the summed completion loss of its 8 examples
    (one micro-batch, accumulation 1), not their token mean."""
    pytest.importorskip("trl")
    from packcollate.integrations.trl import PackedSFTTrainer
    from packcollate.tools.toy import char_tokenizer
    from tests.helpers import prompt_completion
    from tests.helpers import tiny_chat_model as tiny_causal_lm
    from tests.helpers import trl_config as config

    trainer = PackedSFTTrainer(model=tiny_causal_lm(),
                               args=config(tmp_path, per_device_train_batch_size=8, max_steps=1),
                               train_dataset=prompt_completion(8), processing_class=char_tokenizer(),
                               loss_weighting="sum")
    reference = tiny_causal_lm()
    with torch.no_grad():
        total = 0.0
        for row in trainer.train_dataset:
            ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])  # TRL masks the prompt
            targets = int((labels[1:] != -100).sum())
            total += reference(input_ids=ids[None], labels=labels[None]).loss.item() * targets
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0] == pytest.approx(total, rel=1e-4)
