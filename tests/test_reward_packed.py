"""Sequence-classification (reward) models on a packed row: every example is scored at its last
non-pad token exactly as the padded forward scores it (logits and gradients), for the Llama, Qwen2,
Qwen3, Gemma, Gemma 2 and Mistral heads; `PackedRewardTrainer` equals TRL's `RewardTrainer`.

Tiny random models from configs (CPU, float32 and float64), local tokenizer: nothing is downloaded.
"""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import packcollate  # noqa: F401
from packcollate.compat import tiny_config
from packcollate.collate.preference import PackedPairCollator
from packcollate.objectives.segments import padding_mask, to_padded
from packcollate.compat.guard import assert_sequence_scores_safe
from packcollate.objectives.scores import packed_sequence_logits, score_head

torch.set_num_threads(1)
FAMILIES = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "mistral"]
LENGTHS = (11, 27, 5, 19, 8, 14)


def classifier_pair(model_type, num_labels=1, pad_token_id=0, dtype=torch.float64):
    """(padded eager model, packcollate model) with the same weights."""
    config = tiny_config(model_type, num_labels=num_labels, pad_token_id=pad_token_id, use_cache=False)
    torch.manual_seed(0)
    padded = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").to(dtype)
    packed = AutoModelForSequenceClassification.from_config(config, attn_implementation="packcollate").to(dtype)
    packed.load_state_dict(padded.state_dict())
    return padded.eval(), packed.eval()


def sequences(seed=0, end_token=None):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(3, 200, (n,), generator=g) for n in LENGTHS]
    return [torch.cat([s, torch.tensor([end_token] * 2)]) for s in out] if end_token is not None else out


def packed_batch(seqs):
    return PackedPairCollator()([{"chosen_ids": a.tolist(), "rejected_ids": b.tolist()}
                                 for a, b in zip(seqs[: len(seqs) // 2], seqs[len(seqs) // 2 :])])


def grads(model, scores, weights):
    model.zero_grad()
    (scores * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_scores_and_gradients_equal_padded(model_type, dtype):
    padded_model, packed_model = classifier_pair(model_type, num_labels=2, dtype=dtype)
    batch = packed_batch(sequences())
    cu = batch["cu_seq_lens_q"].long()
    input_ids = to_padded(batch["input_ids"], cu, fill=0)
    expected = padded_model(input_ids=input_ids, attention_mask=padding_mask(cu).long()).logits
    scores, _ = packed_sequence_logits(packed_model, batch)
    assert scores.shape == expected.shape == (len(LENGTHS), 2)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(scores, expected, rtol=tol, atol=tol)
    weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    theirs, ours = grads(padded_model, expected, weights), grads(packed_model, scores, weights)
    assert theirs.keys() == ours.keys()
    for name in theirs:
        # Gemma's RMSNorm computes in float32 whatever the model's dtype: float32 tolerance on its weights
        rtol = max(tol, 1e-5) if "norm" in name and model_type.startswith("gemma") else tol
        torch.testing.assert_close(ours[name], theirs[name], rtol=rtol, atol=rtol * theirs[name].abs().max().item(),
                                   msg=name)


def test_pad_tokens_inside_an_example_follow_the_hf_rule():
    """pad == eos (TRL's fallback): the head skips trailing pad-id tokens, in each packed example too."""
    padded_model, packed_model = classifier_pair("llama", pad_token_id=2)
    batch = packed_batch(sequences(end_token=2))
    cu = batch["cu_seq_lens_q"].long()
    expected = padded_model(input_ids=to_padded(batch["input_ids"], cu, fill=2),
                            attention_mask=padding_mask(cu).long()).logits
    scores, _ = packed_sequence_logits(packed_model, batch)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_scoring_guard_passes_on_the_packcollate_backend(model_type):
    _, packed_model = classifier_pair(model_type, dtype=torch.float32)
    assert assert_sequence_scores_safe(packed_model) < 1e-4


def test_not_a_classifier_is_named():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        score_head(model)


# -- TRL's RewardTrainer ------------------------------------------------------------------------------

def reward_trainers(tmp_path, **options):
    pytest.importorskip("trl")
    import datasets
    from trl import RewardConfig, RewardTrainer

    from packcollate.integrations.trl import PackedRewardTrainer
    from packcollate.tools.toy import arithmetic_problems, char_tokenizer

    rows = [{"prompt": p["prompt"], "chosen": " " + p["completion"], "rejected": " The answer is 3." * (1 + i % 3),
             "margin": 0.1 * i} for i, p in enumerate(arithmetic_problems(6, seed=9))]
    made = []
    for cls, attn in ((RewardTrainer, "sdpa"), (PackedRewardTrainer, "packcollate")):
        config = tiny_config("llama", vocab_size=len(char_tokenizer()), num_labels=1, pad_token_id=0, use_cache=False)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn).double()
        args = RewardConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=6, max_steps=2,
                            report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1, **options)
        made.append(cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                        processing_class=char_tokenizer()))
    return made


@pytest.mark.parametrize("options", [{}, {"center_rewards_coefficient": 0.01}])
def test_reward_trainer_loss_metrics_gradients_equal_padded(tmp_path, options):
    theirs, ours = reward_trainers(tmp_path, **options)
    assert isinstance(ours.data_collator, PackedPairCollator)
    results = []
    for trainer in (theirs, ours):
        trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.detach(), {k: v[-1] for k, v in trainer._metrics["train"].items()},
                        {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}, batch))
    (loss_t, metrics_t, grads_t, _), (loss_o, metrics_o, grads_o, batch) = results
    assert "attention_mask" not in batch and "margin" in batch
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-10, atol=1e-12)
    assert metrics_o.keys() == metrics_t.keys() and metrics_o == pytest.approx(metrics_t, rel=1e-9)
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], rtol=1e-9, atol=1e-12, msg=name)
    ours.train()  # the scoring guard runs at train start (check_packing default)
    assert ours.state.global_step == 2


def test_lora_classifier_scores_and_gradients_equal_padded():
    """PEFT-wrapped (LoRA on attention, the score head trained in full via modules_to_save)."""
    peft = pytest.importorskip("peft")
    wrapped = []
    for model in classifier_pair("qwen3"):
        torch.manual_seed(3)
        config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        wrapped.append(peft.get_peft_model(model, config).double())
    padded_model, packed_model = wrapped
    batch = packed_batch(sequences())
    cu = batch["cu_seq_lens_q"].long()
    expected = padded_model(input_ids=to_padded(batch["input_ids"], cu, fill=0),
                            attention_mask=padding_mask(cu).long()).logits
    scores, _ = packed_sequence_logits(packed_model, batch)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs, ours = grads(padded_model, expected, weights), grads(packed_model, scores, weights)
    assert any("lora" in name for name in ours) and any("score" in name for name in ours)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12, msg=name)
