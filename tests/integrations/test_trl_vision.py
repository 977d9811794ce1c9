"""TRL's vision-language data path (`packcollate.integrations.trl_vision`: chats with images + a processor), packed
by `PackedSFTTrainer`:
same per-step losses as TRL's own padded `SFTTrainer`; the token budget counts image tokens.

Locally built Qwen2-VL and Gemma 3 processors (`packcollate.tools.toy_vision`) and tiny random models: nothing
downloaded.
"""

import pytest

trl = pytest.importorskip("trl")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from packcollate import PackedCollator  # noqa: E402
from packcollate.collate.vision import PackedVisionCollator  # noqa: E402
from packcollate.compat.vision import tiny_vision_config  # noqa: E402
from packcollate.integrations.trl import PackedSFTTrainer  # noqa: E402
from packcollate.integrations.trl_vision import ProcessThenPack  # noqa: E402
from packcollate.layout import BLOCK_IDS  # noqa: E402
from packcollate.tools.toy_vision import image_chats, vision_processor, vision_token_ids  # noqa: E402

torch.set_num_threads(1)
STEPS = 3


def tiny_vlm(processor, attn_implementation, family="qwen2_vl"):
    config = tiny_vision_config(family)
    for key, value in vision_token_ids(processor).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation)


def sft_config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-3,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, max_length=None,
                shuffle_dataset=False, dataloader_drop_last=False)
    base.update(overrides)
    return SFTConfig(**base)


def first_batch_diffs(padded_model, padded, packed_model, packed) -> tuple[float, float]:
    """One forward + backward of TRL's padded batch and of our packed one: max |logit diff| over the real
    tokens and the max relative gradient difference. Gradients are left zeroed."""
    from packcollate.compat.equivalence import (
        gradients,
        max_relative_grad_diff,
        summed_token_loss,
    )

    runs = []
    for model, batch in ((padded_model, dict(padded)), (packed_model, dict(packed))):
        labels = batch.pop("labels")
        out = model(**batch, use_cache=False)
        (summed_token_loss(out.logits, labels) / int((labels[:, 1:] != -100).sum())).backward()
        real = out.logits[padded["attention_mask"].bool()] if model is padded_model else out.logits[0]
        runs.append((real.detach(), gradients(model)))
        model.zero_grad(set_to_none=True)
    return float((runs[0][0] - runs[1][0]).abs().max()), max_relative_grad_diff(runs[1][1], runs[0][1])[0]


def losses(trainer):
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def processor():
    return vision_processor()


@pytest.fixture(scope="module")
def chats():
    rows = image_chats(12, seed=1)
    assert {len(r["images"]) for r in rows} == {0, 1, 2}
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_packed_sft_trainer_matches_trl_padded_on_image_chats(tmp_path, processor, chats, assistant_only_loss):
    options = dict(assistant_only_loss=assistant_only_loss)
    try:
        theirs = SFTTrainer(model=tiny_vlm(processor, "eager"), args=sft_config(tmp_path / "trl", **options),
                            train_dataset=chats, processing_class=processor)
    except ValueError as error:  # read at run time: TRL 1.16 needs transformers >= 5.18 for this option
        if "requires transformers" not in str(error):
            raise
        pytest.skip(f"TRL refuses this setting with this transformers: {error}")
    ours = PackedSFTTrainer(model=tiny_vlm(processor, "packcollate"), args=sft_config(tmp_path / "ours", **options),
                            train_dataset=chats, processing_class=processor)
    assert isinstance(ours.data_collator, ProcessThenPack)
    assert isinstance(ours.data_collator.pack, PackedVisionCollator)
    batch = ours.data_collator([chats[i] for i in range(4)])
    assert batch["position_ids"].shape[:2] == (4, 1) and "attention_mask" not in batch
    ref, got = losses(theirs), losses(ours)
    assert len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("rope_positions", [True, False])
def test_first_batch_logits_and_gradients_match_trl_padded(tmp_path, processor, chats, rope_positions):
    """TRL's padded batch through eager vs our packed batch through packcollate: logits on every real token
    and every gradient. Without the model's rope index (1-D positions) the same check fails."""
    theirs = SFTTrainer(model=tiny_vlm(processor, "eager"), args=sft_config(tmp_path / "trl"),
                        train_dataset=chats, processing_class=processor)
    ours = PackedSFTTrainer(model=tiny_vlm(processor, "packcollate"), args=sft_config(tmp_path / "ours"),
                            train_dataset=chats, processing_class=processor)
    if not rope_positions:
        ours.data_collator.pack.rope_owner = None
    examples = [chats[i] for i in range(4)]
    padded, packed = theirs.data_collator([dict(e) for e in examples]), ours.data_collator(examples)
    logit_diff, grad_diff = first_batch_diffs(theirs.model, padded, ours.model, packed)
    if rope_positions:
        assert logit_diff < 1e-4 and grad_diff < 1e-3, (logit_diff, grad_diff)
    else:
        assert logit_diff > 1e-3


def test_given_packed_collator_is_upgraded_with_its_options(tmp_path, processor, chats):
    trainer = PackedSFTTrainer(model=tiny_vlm(processor, "packcollate"), args=sft_config(tmp_path),
                               train_dataset=chats, processing_class=processor,
                               data_collator=PackedCollator(max_seq_length=64, overflow="drop"))
    pack = trainer.data_collator.pack
    assert isinstance(pack, PackedVisionCollator) and pack.max_seq_length == 64 and pack.overflow == "drop"
    assert pack.rope_owner is not None


def test_token_budget_counts_image_tokens(tmp_path, processor, chats):
    trainer = PackedSFTTrainer(model=tiny_vlm(processor, "packcollate"), args=sft_config(tmp_path),
                               train_dataset=chats, processing_class=processor, max_tokens_per_batch=160)
    lengths = trainer.example_lengths(chats)
    image_id = vision_token_ids(processor)["image_token_id"]
    for example, length in zip(chats, lengths):
        processed = trainer.data_collator.process(example)
        n_image = int((processed["input_ids"] == image_id).sum())
        assert length == processed["input_ids"].shape[-1] and (n_image > 0) == bool(example["images"])
    loader = trainer.get_train_dataloader()
    for batch in loader:
        assert batch["input_ids"].shape[1] <= 160 or len(batch["cu_seq_lens_q"]) == 2
    assert losses(trainer)


def test_gemma3_bidirectional_image_tokens_match_trl_padded(tmp_path, chats):
    """Gemma 3's processor marks image tokens (token_type_ids) as bidirectional; TRL's padded batch keeps the
    marks. Packed with the family's block ids through the packcollate backend: the first batch's logits and
    gradients equal TRL's padded ones, and so do the losses, step by step (rel 1e-3: Adam's normalisation
    turns 1e-7 gradient differences on near-zero gradients into visible loss drift by step 3)."""
    processor = vision_processor(family="gemma3")
    theirs = SFTTrainer(model=tiny_vlm(processor, "eager", "gemma3"), args=sft_config(tmp_path / "trl"),
                        train_dataset=chats, processing_class=processor)
    ours = PackedSFTTrainer(model=tiny_vlm(processor, "packcollate", "gemma3"), args=sft_config(tmp_path / "ours"),
                            train_dataset=chats, processing_class=processor)
    examples = [chats[i] for i in range(4)]
    padded, packed = theirs.data_collator([dict(e) for e in examples]), ours.data_collator(examples)
    assert "token_type_ids" in padded and bool((padded["token_type_ids"] == 1).any())
    image_id = vision_token_ids(processor)["image_token_index"]
    assert torch.equal(packed[BLOCK_IDS][0] >= 0, packed["input_ids"][0] == image_id)
    logit_diff, grad_diff = first_batch_diffs(theirs.model, padded, ours.model, packed)
    assert logit_diff < 1e-4 and grad_diff < 1e-3, (logit_diff, grad_diff)
    ref, got = losses(theirs), losses(ours)
    assert len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-3)
