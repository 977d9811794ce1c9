"""`PackedTrainer` (`packcollate.integrations.trainer`): Hugging Face Trainer with packed batches trains exactly like
with padded ones.

Tiny random Llama (CPU, fp32), SGD with lr 1 and no clipping, so the weight change of one
optimizer step is exactly minus the gradient: padded, packed, packed with gradient accumulation,
token-budget batches and 2 ranks (torchrun, gloo) must all change the weights identically; so must the
adapters of a LoRA (PEFT) model, and a `torch.compile`d model. Token budgets follow the rows a dataset
shows, evaluation follows the training budget, and the packing guard stops a contaminating setup before
the first step.
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

import packcollate  # noqa: F401
from packcollate import PackedCollator, PaddedCollator
from packcollate.batching.lengths import example_lengths
from packcollate.integrations import PackedTrainer
from tests.helpers import (
    adapter_change,
    arguments,
    assert_same_adapter_change,
    assert_same_change,
    lora_model,
    prompt_completion_dataset,
    tiny_model,
    weight_change,
)
from tests.scripts.two_ranks import launch


def test_packed_trainer_equals_padded(padded_reference, tmp_path):
    """Default remove_unused_columns=True: PackedTrainer keeps completion_mask, so the prompt stays masked."""
    change = weight_change(PackedTrainer, tmp_path, train_dataset=prompt_completion_dataset(), check_packing=False)
    assert_same_change(padded_reference, change)


def test_gradient_accumulation_keeps_the_token_mean(padded_reference, tmp_path):
    """4 packed micro-batches of 4 examples, of different token counts, make one padded step of 16."""
    args = arguments(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=4)
    change = weight_change(PackedTrainer, tmp_path, args=args, train_dataset=prompt_completion_dataset(),
                           check_packing=False)
    assert_same_change(padded_reference, change)


def test_token_budget_batches_equal_padded(padded_reference, tmp_path):
    """Budget batches (variable examples per micro-batch) over one accumulated step: same change."""
    dataset = prompt_completion_dataset()
    total = sum(len(x) for x in dataset["input_ids"])
    budget = total // 3 + 40  # about 3-4 micro-batches for the 16 examples
    trainer_args = arguments(tmp_path, gradient_accumulation_steps=8, max_steps=-1, num_train_epochs=1)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PackedTrainer(model=model, args=trainer_args, train_dataset=dataset, max_tokens_per_batch=budget,
                            optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None), check_packing=False)
    trainer.train()
    assert trainer.state.global_step == 1
    change = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert_same_change(padded_reference, change)


def test_token_budget_sees_every_example_once_per_epoch(tmp_path):
    dataset = prompt_completion_dataset(n=40)
    collator = PackedCollator(passthrough_keys=["idx"])
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path, remove_unused_columns=False),
                            train_dataset=dataset, data_collator=collator, max_tokens_per_batch=200,
                            check_packing=False)
    batches = list(trainer.get_train_dataloader())
    seen = sorted(i for batch in batches for i in batch["idx"].tolist())
    assert seen == list(range(40))
    assert all(batch["input_ids"].shape[1] <= 200 for batch in batches)


@pytest.mark.parametrize("view", ["shuffle-select", "filter"])
def test_token_budget_follows_the_rows_a_dataset_shows(tmp_path, view):
    """After select/shuffle/filter the lengths are those of the rows the dataset shows, in its order."""
    dataset = prompt_completion_dataset(n=40)
    if view == "shuffle-select":
        dataset = dataset.shuffle(seed=3).select(range(25))
    else:
        dataset = dataset.filter(lambda row: row["idx"] % 3 != 0)
    assert example_lengths(dataset).tolist() == [len(ids) for ids in dataset["input_ids"]]
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path, remove_unused_columns=False),
                            train_dataset=dataset, data_collator=PackedCollator(passthrough_keys=["idx"]),
                            max_tokens_per_batch=120, check_packing=False)
    batches = list(trainer.get_train_dataloader())
    assert sorted(i for batch in batches for i in batch["idx"].tolist()) == sorted(dataset["idx"])
    assert all(batch["input_ids"].shape[1] <= 120 for batch in batches)


def test_token_budget_reads_the_length_column(tmp_path):
    """A `length` column is read though the Trainer removes it as an unused column; one that disagrees with
    the tokens the collator packs is refused ([17] H4: a `length` of 1000 used to be trusted)."""
    dataset = prompt_completion_dataset(n=12)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=dataset.add_column("length", lengths),
                            max_tokens_per_batch=max(lengths), check_packing=False)
    batches = list(trainer.get_train_dataloader())
    assert sorted(n for batch in batches for n in np.diff(batch["cu_seq_lens_q"].numpy())) == sorted(lengths)
    assert all(batch["input_ids"].shape[1] <= max(lengths) for batch in batches)
    lying = dataset.add_column("length", [1000] * len(dataset))
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=lying,
                            max_tokens_per_batch=1000, check_packing=False)
    with pytest.raises(ValueError, match="row 0: key 'length': expected the 34 tokens of its 'input_ids'"):
        trainer.get_train_dataloader()


def test_long_validation_examples_never_crash(tmp_path):
    """The length policy applies to every split: a 300-token eval example with max_seq_length=64."""
    collator = PackedCollator(max_seq_length=64)
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=prompt_completion_dataset(),
                            eval_dataset=prompt_completion_dataset(n=8, seed=1, long_every=4),
                            data_collator=collator, check_packing=False)
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    assert collator.stats.truncated_sequences == 2


def test_token_budget_eval_loader(tmp_path):
    eval_set = prompt_completion_dataset(n=12, seed=2)
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), eval_dataset=eval_set,
                            eval_max_tokens_per_batch=120, check_packing=False)
    assert all(batch["input_ids"].shape[1] <= 120 for batch in trainer.get_eval_dataloader())
    assert np.isfinite(trainer.evaluate()["eval_loss"])


def test_eval_follows_the_training_budget_unless_told_otherwise(tmp_path):
    eval_set = prompt_completion_dataset(n=12, seed=2)

    def eval_widths(**budgets):
        trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), eval_dataset=eval_set,
                                check_packing=False, **budgets)
        return [batch["input_ids"].shape[1] for batch in trainer.get_eval_dataloader()]

    assert max(eval_widths(max_tokens_per_batch=100)) <= 100  # the training budget
    assert max(eval_widths(max_tokens_per_batch=100, eval_max_tokens_per_batch=150)) <= 150
    fixed = eval_widths(max_tokens_per_batch=100, eval_max_tokens_per_batch=0)  # 0: per_device_eval_batch_size (4)
    assert len(fixed) == 3


def test_examples_over_the_budget_are_announced(tmp_path, caplog):
    dataset = prompt_completion_dataset(n=8, long_every=4)  # 2 examples of 300 tokens
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=dataset,
                            max_tokens_per_batch=200, check_packing=False)
    with caplog.at_level("WARNING", logger="packcollate"):
        batches = list(trainer.get_train_dataloader())
    assert "training: 2 examples are longer than the token budget (200)" in caplog.text
    assert sorted(b["input_ids"].shape[1] for b in batches if b["input_ids"].shape[1] > 200) == [300, 300]


def test_two_ranks_with_torchrun_equal_padded(padded_reference, tmp_path, free_port):
    """The same global step over 2 ranks (torchrun, gloo, CPU), token-budget batches: same change."""
    out = tmp_path / "change.pt"
    launch("ddp_trainer_step.py", str(out), port=free_port)
    assert_same_change(padded_reference, torch.load(out))


def test_guard_stops_a_contaminating_setup_before_the_first_step(tmp_path):
    """sdpa with a cache mixes packed examples: PackedTrainer's guard refuses to train."""
    model = tiny_model("sdpa")
    trainer = PackedTrainer(model=model, args=arguments(tmp_path, use_cache=True), train_dataset=prompt_completion_dataset())
    with pytest.raises(RuntimeError, match=r"packed batches are not safe for LlamaForCausalLM with attn_implementation='sdpa'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_guard_lets_the_packcollate_backend_train(tmp_path):
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path, use_cache=True),
                            train_dataset=prompt_completion_dataset())
    trainer.train()
    assert trainer.state.global_step == 1


# ---------------------------------------------------------------------------------------------
# LoRA (PEFT) and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def padded_lora_change(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("padded-lora")
    return adapter_change(Trainer, tmp, lora_model("sdpa"), args=arguments(tmp, remove_unused_columns=False),
                          train_dataset=prompt_completion_dataset(), data_collator=PaddedCollator(passthrough_keys=["idx"]))


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lora_packed_trainer_equals_padded(padded_lora_change, tmp_path, gradient_checkpointing):
    """PackedTrainer on a PeftModel (guard on): the adapters get the padded gradients, with and
    without gradient checkpointing."""
    args = arguments(tmp_path, gradient_checkpointing=gradient_checkpointing)
    change = adapter_change(PackedTrainer, tmp_path, lora_model(), args=args, train_dataset=prompt_completion_dataset())
    assert_same_adapter_change(padded_lora_change, change)


def test_packed_trainer_trains_a_compiled_model(tmp_path):
    """PackedTrainer(model=torch.compile(m)): the guard sees the Llama inside; the step equals eager."""
    dataset = prompt_completion_dataset()
    eager = tiny_model()
    compiled = tiny_model()
    before = {n: p.detach().clone() for n, p in eager.named_parameters()}
    for model in (eager, torch.compile(compiled, backend="aot_eager", dynamic=True)):
        PackedTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset,
                      optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None)).train()
    for name, param in compiled.named_parameters():
        change, reference = param.detach() - before[name], dict(eager.named_parameters())[name].detach() - before[name]
        assert float((change - reference).norm() / reference.norm()) < 1e-5, name


def test_a_model_init_model_is_prepared(tmp_path):
    """`model_init` builds the model inside `train()`, after the trainer's own checks: it is prepared there,
    so the train-start guard, which refuses an unprepared Mamba-2, passes it and the step runs."""
    from packcollate.compat import tiny_config

    def model_init():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config("mamba2"), attn_implementation="packcollate")

    trainer = PackedTrainer(model_init=model_init, args=arguments(tmp_path), train_dataset=prompt_completion_dataset())
    trainer.train()  # the guard (check_packing=True) refuses an unprepared Mamba-2
    assert trainer.state.global_step == 1
