"""`PackedSFTTrainer` (`packcollate.integrations.trl`): TRL's SFTTrainer with our collator.

Datasets prepared by TRL collate correctly with our collator, and `PackedSFTTrainer` trains exactly like
TRL's own padding-free collator (same loss at every step). With TRL's defaults: `max_length=1024` with
`padding_free=True`, TRL's label rule (a dataset's own `labels` are kept as they are), and `bf16=True` on
CPU, differential against TRL's own `SFTTrainer`. LoRA through `peft_config` gives TRL's padded adapter
gradients.

Local character tokenizer and a tiny random Llama: nothing is downloaded.
"""

import pytest

trl = pytest.importorskip("trl")

import datasets  # noqa: E402
import torch  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import packcollate  # noqa: E402,F401
from packcollate import PackedCollator  # noqa: E402
from packcollate.integrations.trl import PackedSFTTrainer  # noqa: E402
from packcollate.tools.toy import (  # noqa: E402
    arithmetic_problems,
    char_tokenizer,
    tokenize_prompt_completion,
)
from tests.helpers import (  # noqa: E402
    STEPS,
    adapter_gradients,
    lora_config,
    losses,
    prompt_completion,
    prompt_completion_dataset,
    tiny_chat_model,
    tiny_model,
    trl_config,
)
from tests.helpers import assert_same_adapter_change as assert_same_change


def conversations(n=24):
    rows = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]}
            for p in arithmetic_problems(n, seed=4)]
    return datasets.Dataset.from_list(rows)


def run_pair(tmp_path, dataset, ours_padding_free=False, **sft_options):
    """(TRL's padding-free collator, PackedSFTTrainer) on the same data: per-step losses."""
    theirs = SFTTrainer(model=tiny_chat_model(), args=trl_config(tmp_path / "trl", padding_free=True, **sft_options),
                        train_dataset=dataset, processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_chat_model(), args=trl_config(tmp_path / "ours", padding_free=ours_padding_free,
                                                            **sft_options),
                            train_dataset=dataset, processing_class=char_tokenizer())
    assert isinstance(ours.data_collator, PackedCollator)
    return losses(theirs), losses(ours), ours


@pytest.mark.parametrize("ours_padding_free", [False, True])
def test_prompt_completion_matches_trl(tmp_path, ours_padding_free):
    theirs, ours, trainer = run_pair(tmp_path, prompt_completion(), ours_padding_free=ours_padding_free)
    assert len(ours) == STEPS
    assert max(abs(a - b) for a, b in zip(theirs, ours)) < 1e-5
    batch = next(iter(trainer.get_train_dataloader()))
    assert "cu_seq_lens_q" in batch and "attention_mask" not in batch
    masked = (batch["labels"] == -100).float().mean()
    assert masked > 0.3  # the prompts (about half the tokens) are not trained on


def test_conversational_assistant_only_matches_trl(tmp_path):
    theirs, ours, _ = run_pair(tmp_path, conversations(), assistant_only_loss=True)
    assert max(abs(a - b) for a, b in zip(theirs, ours)) < 1e-5


def test_bfd_packed_rows_match_trl(tmp_path):
    """packing=True (BFD): TRL's rows carry `seq_lengths`; positions restart at every sub-sequence."""
    theirs, ours, trainer = run_pair(tmp_path, prompt_completion(48), packing=True, max_length=512,
                                     per_device_train_batch_size=2)
    assert max(abs(a - b) for a, b in zip(theirs, ours)) < 1e-5
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["cu_seq_lens_q"]) > 3  # more sub-sequences than rows


def test_our_collator_on_trl_prepared_columns(tmp_path):
    """TRL's prepared dataset keeps `input_ids`, `labels` (and `seq_lengths` when packed): the collator reads them."""
    trainer = PackedSFTTrainer(model=tiny_chat_model(), args=trl_config(tmp_path, packing=True, max_length=512),
                               train_dataset=prompt_completion(), processing_class=char_tokenizer())
    columns = set(trainer.train_dataset.column_names)
    assert {"input_ids", "labels", "seq_lengths"} <= columns
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows)
    assert len(batch["cu_seq_lens_q"]) == 1 + sum(len(r["seq_lengths"]) for r in rows)


# ---------------------------------------------------------------------------------------------
# TRL's defaults
# ---------------------------------------------------------------------------------------------


def sft_config(tmp_path, name, **overrides) -> SFTConfig:
    """TRL's defaults but for what a CPU test must set (steps, logging, no saving, fp32 unless asked)."""
    base = dict(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=8, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, shuffle_dataset=False, bf16=False)
    base.update(overrides)
    return SFTConfig(**base)


def test_default_max_length_with_padding_free(tmp_path):
    """SFTConfig(padding_free=True) keeps max_length=1024, which TRL refuses without packing: it becomes
    the collator's max_seq_length, and the SFTConfig is left as it was."""
    args = sft_config(tmp_path, "pf", padding_free=True)
    assert args.max_length == 1024
    trainer = PackedSFTTrainer(model=tiny_chat_model(), args=args, train_dataset=prompt_completion(),
                               processing_class=char_tokenizer())
    assert isinstance(trainer.data_collator, PackedCollator) and trainer.data_collator.max_seq_length == 1024
    assert args.max_length == 1024
    assert len(losses(trainer)) == 2


def test_max_length_truncates_like_trl(tmp_path):
    """max_length shorter than some examples: PackedSFTTrainer(padding_free=True) truncates in the collator
    (keeping each example's start) and trains exactly like TRL's padded SFTTrainer, which truncates while
    preparing the data."""
    dataset = prompt_completion()
    prepared = SFTTrainer(model=tiny_chat_model(), args=sft_config(tmp_path, "probe", max_length=None),
                          train_dataset=dataset, processing_class=char_tokenizer()).train_dataset
    prompts = [next(i for i, label in enumerate(row) if label != -100) for row in prepared["labels"]]
    max_length = max(prompts) + 16  # no example is left without a target (TRL would drop it)
    assert max_length < max(len(row) for row in prepared["input_ids"])  # some examples are truncated

    theirs = SFTTrainer(model=tiny_chat_model(), args=sft_config(tmp_path, "trl", max_length=max_length),
                        train_dataset=dataset, processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_chat_model(), args=sft_config(tmp_path, "ours", max_length=max_length,
                                                                padding_free=True),
                            train_dataset=dataset, processing_class=char_tokenizer())
    reference, packed = losses(theirs), losses(ours)
    assert max(abs(a - b) for a, b in zip(reference, packed)) < 1e-5
    assert ours.data_collator.stats.truncated_sequences > 0


def test_truncation_from_the_end_is_refused_with_padding_free(tmp_path):
    args = sft_config(tmp_path, "end", padding_free=True, truncation_mode="keep_end")
    with pytest.raises(ValueError, match="truncation_mode='keep_start'.*set padding_free=False"):
        PackedSFTTrainer(model=tiny_chat_model(), args=args, train_dataset=prompt_completion(),
                         processing_class=char_tokenizer())


def labelled_dataset(n=16) -> datasets.Dataset:
    """input_ids, completion_mask and the dataset's own labels (every third token masked, not the prompt)."""
    rows = tokenize_prompt_completion(arithmetic_problems(n, seed=5))
    for row in rows:
        row["labels"] = [-100 if i % 3 == 0 else token for i, token in enumerate(row["input_ids"])]
    return datasets.Dataset.from_list(rows)


def targets(trainer) -> int:
    return sum(int((batch["labels"] != -100).sum()) for batch in trainer.get_train_dataloader())


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_a_dataset_with_labels_keeps_them(tmp_path, remove_unused_columns):
    """TRL's label rule: labels given are kept; completion_mask is not applied on top of them."""
    dataset = labelled_dataset()
    options = dict(max_length=None, max_steps=1, per_device_train_batch_size=16, remove_unused_columns=remove_unused_columns)
    theirs = SFTTrainer(model=tiny_chat_model(), args=sft_config(tmp_path, "trl", padding_free=True, **options),
                        train_dataset=dataset, processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_chat_model(), args=sft_config(tmp_path, "ours", **options),
                            train_dataset=dataset, processing_class=char_tokenizer())
    expected = sum(sum(label != -100 for label in row[1:]) for row in dataset["labels"])
    assert targets(theirs) == targets(ours) == expected
    assert abs(losses(theirs)[0] - losses(ours)[0]) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="what bf16=True does without CUDA")
def test_bf16_default_without_cuda(tmp_path):
    """TRL's bf16=True default: without CUDA, SFTConfig itself raises unless use_cpu=True; with it, the
    step runs under CPU bf16 autocast (fp32 weights) and the packed loss matches TRL's padded one to bf16
    precision."""
    with pytest.raises(ValueError, match="use_cpu"):
        SFTConfig(output_dir=str(tmp_path / "plain"), report_to=[])
    dataset = prompt_completion()
    options = dict(bf16=True, max_steps=1)
    theirs = SFTTrainer(model=tiny_chat_model(), args=sft_config(tmp_path, "trl", **options), train_dataset=dataset,
                        processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_chat_model(), args=sft_config(tmp_path, "ours", padding_free=True, **options),
                            train_dataset=dataset, processing_class=char_tokenizer())
    assert ours.accelerator.mixed_precision == "bf16"
    assert next(ours.model.parameters()).dtype == torch.float32
    dtypes = []
    ours.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    reference, packed = losses(theirs)[0], losses(ours)[0]
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the step ran under CPU bf16 autocast
    assert abs(reference - packed) < 2e-2 * abs(reference)


# ---------------------------------------------------------------------------------------------
# LoRA through peft_config
# ---------------------------------------------------------------------------------------------


def test_lora_through_packed_sft_trainer_peft_config_equals_padded(tmp_path):
    """PackedSFTTrainer(peft_config=...) with TRL's default gradient checkpointing vs TRL's own padded
    SFTTrainer: the same adapter gradients."""
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    from packcollate.integrations.trl import PackedSFTTrainer

    dataset = prompt_completion_dataset().remove_columns("idx")

    def change(trainer_cls, name, attn, **options):
        args = SFTConfig(str(tmp_path / name), max_steps=1, per_device_train_batch_size=16, learning_rate=1.0,
                         optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                         report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0, shuffle_dataset=False,
                         max_length=None, **options)
        torch.manual_seed(1)
        trainer = trainer_cls(model=tiny_model(attn), args=args, train_dataset=dataset, peft_config=lora_config(),
                              processing_class=_tokenizer())
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return start, adapter_gradients(trainer)

    start_padded, padded = change(SFTTrainer, "padded", "sdpa")
    start_packed, packed = change(PackedSFTTrainer, "packed", "packcollate")
    assert all(torch.equal(start_padded[n], start_packed[n]) for n in start_padded)  # the same adapters
    assert_same_change(padded, packed)


def _tokenizer():
    from packcollate.tools.toy import char_tokenizer

    return char_tokenizer()
