"""Hugging Face Trainer with packed batches trains exactly like with padded ones.

Tiny random Llama (CPU, fp32), SGD with lr 1 and no clipping, so the weight change of one
optimizer step is exactly minus the gradient: padded, packed, packed with gradient accumulation,
token-budget batches and 2 ranks (torchrun, gloo) must all change the weights identically.
"""

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import packcollate  # noqa: F401
from packcollate import PackedCollator, PaddedCollator
from packcollate.integrations import PackedTrainer, count_label_tokens, micro_batches
from packcollate.batching.lengths import example_lengths
from packcollate.integrations.preflight import check_trainer_keeps_masks
from two_ranks import launch

N_EXAMPLES = 16


def tiny_model(attn_implementation="packcollate"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def prompt_completion_dataset(n=N_EXAMPLES, seed=0, long_every=None) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "completion_mask": [], "idx": []}
    for i in range(n):
        length = int(rng.integers(4, 40)) if not (long_every and i % long_every == 0) else 300
        prompt = length // 3
        rows["input_ids"].append(rng.integers(3, 128, length).tolist())
        rows["completion_mask"].append([0] * prompt + [1] * (length - prompt))
        rows["idx"].append(i)
    return datasets.Dataset.from_dict(rows)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=N_EXAMPLES, per_device_eval_batch_size=4,
        max_steps=1, learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        dataloader_drop_last=False,
    )
    base.update(overrides)
    return TrainingArguments(**base)


def weight_change(trainer_cls, tmp_path, collator=None, model=None, **kwargs) -> dict:
    """Train one optimizer step with SGD(lr=1); return {name: new - old} (= -gradient)."""
    model = model or tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = kwargs.pop("args", None) or arguments(tmp_path)
    trainer = trainer_cls(model=model, args=args, data_collator=collator,
                          optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None), **kwargs)
    trainer.train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def assert_same_change(a: dict, b: dict, rtol=1e-5):
    """Every parameter's change equal within `rtol`, relative in L2 norm (robust to fp32 cancellation)."""
    for name in a:
        scale = a[name].norm().clamp_min(1e-12)
        assert float((a[name] - b[name]).norm() / scale) < rtol, name


@pytest.fixture(scope="module")
def padded_reference(tmp_path_factory):
    """One step on all 16 examples, padded, completion-only labels: the reference weight change."""
    tmp = tmp_path_factory.mktemp("padded")
    dataset = prompt_completion_dataset()
    return weight_change(Trainer, tmp, collator=PaddedCollator(passthrough_keys=["idx"]),
                         args=arguments(tmp, remove_unused_columns=False), train_dataset=dataset)


def test_packed_trainer_equals_padded(padded_reference, tmp_path):
    """Default remove_unused_columns=True: PackedTrainer keeps completion_mask, so the prompt stays masked."""
    change = weight_change(PackedTrainer, tmp_path, train_dataset=prompt_completion_dataset(), check_packing=False)
    assert_same_change(padded_reference, change)


def test_plain_trainer_drops_the_completion_mask_and_the_check_says_so(tmp_path):
    """The pitfall PackedTrainer fixes: the plain Trainer removes completion_mask before collation and would
    train on the prompt; `check_trainer_keeps_masks(trainer)` (run by PackedTrainer before its first step,
    tests/test_dropped_columns.py) names it."""
    dataset = prompt_completion_dataset()
    plain = Trainer(model=tiny_model(), args=arguments(tmp_path), data_collator=PackedCollator(), train_dataset=dataset)
    packed = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=dataset, check_packing=False)
    targets = [sum(int((b["labels"] != -100).sum()) for b in t.get_train_dataloader()) for t in (plain, packed)]
    assert targets[0] > targets[1] == sum(sum(mask[1:]) for mask in dataset["completion_mask"])
    with pytest.raises(ValueError, match="expected the 'completion_mask' column of the training dataset to reach the collator"):
        check_trainer_keeps_masks(plain)
    check_trainer_keeps_masks(packed)


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
    """A `length` column is the sampler's measure, though the Trainer removes it as an unused column."""
    dataset = prompt_completion_dataset(n=12)
    dataset = dataset.add_column("length", [1000] * len(dataset))  # each example alone fills the budget
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=dataset,
                            max_tokens_per_batch=1000, check_packing=False)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 12
    assert all(len(batch["cu_seq_lens_q"]) == 2 for batch in batches)


def test_count_label_tokens_of_numpy_batches():
    batches = [PackedCollator(return_tensors="np")([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])] * 2
    count = count_label_tokens(batches)
    assert torch.is_tensor(count) and count.dtype == torch.int64 and int(count) == 2 * 3


def test_long_validation_examples_never_crash(tmp_path):
    """The length policy applies to every split: a 300-token eval example with max_seq_length=64."""
    collator = PackedCollator(max_seq_length=64)
    trainer = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=prompt_completion_dataset(),
                            eval_dataset=prompt_completion_dataset(n=8, seed=1, long_every=4),
                            data_collator=collator, check_packing=False)
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    assert collator.stats.truncated_sequences == 2


def test_packed_eval_loss_equals_padded(tmp_path):
    """Both the token mean over the eval set (the plain Trainer weighs each batch by its rows instead:
    tests/test_eval_lengths.py)."""
    eval_set = prompt_completion_dataset(n=8, seed=1)
    packed = PackedTrainer(model=tiny_model(), args=arguments(tmp_path), eval_dataset=eval_set, check_packing=False)
    padded = PackedTrainer(model=tiny_model("sdpa"), args=arguments(tmp_path, remove_unused_columns=False),
                           eval_dataset=eval_set, data_collator=PaddedCollator(passthrough_keys=["idx"]),
                           check_packing=False)
    assert abs(packed.evaluate()["eval_loss"] - padded.evaluate()["eval_loss"]) < 1e-5


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


@pytest.mark.parametrize("loop", ["torch", "accelerate"])
def test_plain_loop_helpers_give_the_padded_gradient(padded_reference, loop):
    """count_label_tokens + num_items_in_batch in a plain loop (or accelerate's, as in
    examples/accelerate_loop.py): micro-batches of 5, 5, 6 examples."""
    model = tiny_model()
    dataset = prompt_completion_dataset()
    features = [dataset[i] for i in range(N_EXAMPLES)]
    collator = PackedCollator(passthrough_keys=["idx"])
    loader = [collator(features[0:5]), collator(features[5:10]), collator(features[10:16])]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    backward, world = (lambda loss: loss.backward()), 1
    if loop == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        backward, world = accelerator.backward, accelerator.num_processes
    for step in micro_batches(loader, 3):
        n = count_label_tokens(step)
        for batch in step:
            batch = {k: v for k, v in batch.items() if k != "idx"}
            backward(model(**batch, num_items_in_batch=n).loss * world)
        optimizer.step()
    change = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert_same_change(padded_reference, change)


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
