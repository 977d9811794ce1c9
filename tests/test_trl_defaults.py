"""`PackedSFTTrainer` with TRL's defaults: `max_length=1024` with `padding_free=True`, TRL's label rule
(a dataset's own `labels` are kept as they are), and `bf16=True` on CPU. Differential against TRL's
own `SFTTrainer`; local character tokenizer and a tiny random Llama, nothing downloaded.
"""

import pytest

trl = pytest.importorskip("trl")

import datasets  # noqa: E402
import torch  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import packcollate  # noqa: E402,F401
from packcollate import PackedCollator  # noqa: E402
from packcollate.integrations.trl import PackedSFTTrainer  # noqa: E402
from packcollate.tools.toy import arithmetic_problems, char_tokenizer, tokenize_prompt_completion  # noqa: E402

from test_trl_integration import losses, prompt_completion, tiny_model  # noqa: E402


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
    trainer = PackedSFTTrainer(model=tiny_model(), args=args, train_dataset=prompt_completion(),
                               processing_class=char_tokenizer())
    assert isinstance(trainer.data_collator, PackedCollator) and trainer.data_collator.max_seq_length == 1024
    assert args.max_length == 1024
    assert len(losses(trainer)) == 2


def test_max_length_truncates_like_trl(tmp_path):
    """max_length shorter than some examples: PackedSFTTrainer(padding_free=True) truncates in the collator
    (keeping each example's start) and trains exactly like TRL's padded SFTTrainer, which truncates while
    preparing the data."""
    dataset = prompt_completion()
    prepared = SFTTrainer(model=tiny_model(), args=sft_config(tmp_path, "probe", max_length=None),
                          train_dataset=dataset, processing_class=char_tokenizer()).train_dataset
    prompts = [next(i for i, label in enumerate(row) if label != -100) for row in prepared["labels"]]
    max_length = max(prompts) + 16  # no example is left without a target (TRL would drop it)
    assert max_length < max(len(row) for row in prepared["input_ids"])  # some examples are truncated

    theirs = SFTTrainer(model=tiny_model(), args=sft_config(tmp_path, "trl", max_length=max_length),
                        train_dataset=dataset, processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_model(), args=sft_config(tmp_path, "ours", max_length=max_length,
                                                                padding_free=True),
                            train_dataset=dataset, processing_class=char_tokenizer())
    reference, packed = losses(theirs), losses(ours)
    assert max(abs(a - b) for a, b in zip(reference, packed)) < 1e-5
    assert ours.data_collator.stats.truncated_sequences > 0


def test_truncation_from_the_end_is_refused_with_padding_free(tmp_path):
    args = sft_config(tmp_path, "end", padding_free=True, truncation_mode="keep_end")
    with pytest.raises(ValueError, match="truncation_mode='keep_start'.*set padding_free=False"):
        PackedSFTTrainer(model=tiny_model(), args=args, train_dataset=prompt_completion(),
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
    theirs = SFTTrainer(model=tiny_model(), args=sft_config(tmp_path, "trl", padding_free=True, **options),
                        train_dataset=dataset, processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_model(), args=sft_config(tmp_path, "ours", **options),
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
    theirs = SFTTrainer(model=tiny_model(), args=sft_config(tmp_path, "trl", **options), train_dataset=dataset,
                        processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_model(), args=sft_config(tmp_path, "ours", padding_free=True, **options),
                            train_dataset=dataset, processing_class=char_tokenizer())
    assert ours.accelerator.mixed_precision == "bf16"
    assert next(ours.model.parameters()).dtype == torch.float32
    dtypes = []
    ours.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    reference, packed = losses(theirs)[0], losses(ours)[0]
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the step ran under CPU bf16 autocast
    assert abs(reference - packed) < 2e-2 * abs(reference)
