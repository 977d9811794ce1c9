"""TRL's SFTTrainer: datasets prepared by TRL collate correctly with our collator, and
`PackedSFTTrainer` trains exactly like TRL's own padding-free collator (same loss at every step).

Local character tokenizer and a tiny random Llama: nothing is downloaded.
"""

import pytest

trl = pytest.importorskip("trl")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import packcollate  # noqa: E402,F401
from packcollate import PackedCollator  # noqa: E402
from packcollate.integrations.trl import PackedSFTTrainer  # noqa: E402
from packcollate.tools.toy import arithmetic_problems, char_tokenizer  # noqa: E402

STEPS = 3


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="packcollate")


def prompt_completion(n=24):
    return datasets.Dataset.from_list(arithmetic_problems(n, seed=3))


def conversations(n=24):
    rows = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]}
            for p in arithmetic_problems(n, seed=4)]
    return datasets.Dataset.from_list(rows)


def config(tmp_path, **overrides) -> SFTConfig:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=1e-3,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, max_length=None,
                shuffle_dataset=False)
    base.update(overrides)
    return SFTConfig(**base)


def losses(trainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def run_pair(tmp_path, dataset, ours_padding_free=False, **sft_options):
    """(TRL's padding-free collator, PackedSFTTrainer) on the same data: per-step losses."""
    theirs = SFTTrainer(model=tiny_model(), args=config(tmp_path / "trl", padding_free=True, **sft_options),
                        train_dataset=dataset, processing_class=char_tokenizer())
    ours = PackedSFTTrainer(model=tiny_model(), args=config(tmp_path / "ours", padding_free=ours_padding_free,
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
    trainer = PackedSFTTrainer(model=tiny_model(), args=config(tmp_path, packing=True, max_length=512),
                               train_dataset=prompt_completion(), processing_class=char_tokenizer())
    columns = set(trainer.train_dataset.column_names)
    assert {"input_ids", "labels", "seq_lengths"} <= columns
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows)
    assert len(batch["cu_seq_lens_q"]) == 1 + sum(len(r["seq_lengths"]) for r in rows)
