"""Sequence-weighted loss (every example weighs the same): the packed loss and gradients equal the
padded reference — the mean over examples of each example's mean token loss — in a plain loop split
into micro-batches, in `PackedTrainer(loss_weighting="sequence")` with gradient accumulation and a
token budget, and over 2 ranks (torchrun, gloo, CPU)."""

import sys
from pathlib import Path

import pytest
import torch

from packcollate import PackedCollator
from packcollate.integrations import PackedTrainer
from packcollate.objectives.losses import count_loss_examples, per_example_token_loss, sequence_weighted_loss

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer_integration import arguments, prompt_completion_dataset, tiny_model  # noqa: E402
from two_ranks import launch  # noqa: E402

torch.set_num_threads(1)


def padded_reference_change(dataset, model=None):
    """-grad of mean_e(mean token loss of e), one example at a time (the padded rows' per-row mean)."""
    model = model or tiny_model("eager")
    per_example = []
    for ids, mask in zip(dataset["input_ids"], dataset["completion_mask"]):
        ids = torch.tensor(ids)
        labels = ids.masked_fill(torch.tensor(mask) == 0, -100)
        per_example.append(model(input_ids=ids[None], labels=labels[None]).loss)
    loss = torch.stack(per_example).mean()
    loss.backward()
    return {n: -p.grad.detach().clone() for n, p in model.named_parameters()}, loss.item()


def assert_same_change(expected, got):
    """Changes read back from float32 weights (`new - old`) are exact to one ulp of the weight: that
    much absolute slack per element, plus 1e-5 of the parameter's largest change."""
    weights = dict(tiny_model().named_parameters())
    for name in expected:
        ulp = torch.finfo(torch.float32).eps * weights[name].detach().abs()
        error = (got[name] - expected[name]).abs()
        assert (error <= ulp + 1e-5 * expected[name].abs().max()).all(), (name, error.max().item())


def test_plain_loop_micro_batches_equal_padded():
    dataset = prompt_completion_dataset(n=12)
    expected, expected_loss = padded_reference_change(dataset)
    model = tiny_model()
    rows = [{"input_ids": i, "completion_mask": m} for i, m in zip(dataset["input_ids"], dataset["completion_mask"])]
    collator = PackedCollator()
    step = [collator(rows[:5]), collator(rows[5:9]), collator(rows[9:])]
    n = count_loss_examples(step)
    assert n == 12
    total = 0.0
    for batch in step:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = sequence_weighted_loss(logits, batch["labels"], batch["cu_seq_lens_q"], n)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(expected_loss, rel=1e-5)
    assert_same_change(expected, {n: -p.grad for n, p in model.named_parameters()})


def test_per_example_loss_is_each_examples_mean_and_weights_differ_from_token_mean():
    dataset = prompt_completion_dataset(n=6)
    model = tiny_model()
    rows = [{"input_ids": i, "completion_mask": m} for i, m in zip(dataset["input_ids"], dataset["completion_mask"])]
    batch = PackedCollator()(rows)
    with torch.no_grad():
        out = model(**batch)
        per_example = per_example_token_loss(out.logits, batch["labels"], batch["cu_seq_lens_q"])
        for row, value in zip(rows, per_example):
            ids = torch.tensor(row["input_ids"])
            labels = ids.masked_fill(torch.tensor(row["completion_mask"]) == 0, -100)
            assert value.item() == pytest.approx(model(input_ids=ids[None], labels=labels[None]).loss.item(), rel=1e-5)
        # the model's token mean weighs each example by its targets; the sequence mean does not
        targets = torch.tensor([sum(m[1:]) for m in (r["completion_mask"] for r in rows)], dtype=torch.float)
        assert out.loss.item() == pytest.approx(((per_example * targets).sum() / targets.sum()).item(), rel=1e-5)
        assert abs(per_example.mean().item() - out.loss.item()) > 1e-3


def test_example_without_targets_weighs_nothing():
    logits = torch.randn(1, 7, 5)
    labels = torch.tensor([[-100, 1, 2, -100, -100, -100, 3]])
    cu = torch.tensor([0, 3, 5, 7], dtype=torch.int32)  # example 1 has no target
    per_example = per_example_token_loss(logits, labels, cu)
    assert per_example[1] == 0
    assert sequence_weighted_loss(logits, labels, cu) == pytest.approx((per_example[0] + per_example[2]).item() / 2)


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
    from test_trl_integration import config, prompt_completion
    from test_trl_integration import tiny_model as tiny_causal_lm

    from packcollate.integrations.trl import PackedSFTTrainer
    from packcollate.tools.toy import char_tokenizer

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
