"""Sequence-classification (reward) models on a packed row (`packcollate.objectives.scores`): every example is
scored at its last non-pad token exactly as the padded forward scores it (logits and gradients), for the
Llama, Qwen2, Qwen3, Gemma, Gemma 2 and Mistral heads, LoRA-wrapped too; a model without a classification
head is named. `PackedRewardTrainer`: integrations/test_trl_preference.py.

Tiny random models from configs (CPU, float32 and float64): nothing is downloaded.
"""

import pytest
import torch

import packcollate  # noqa: F401
from packcollate.collate.preference import PackedPairCollator
from packcollate.compat import tiny_config
from packcollate.objectives.scores import packed_sequence_logits, score_head
from packcollate.objectives.segments import padding_mask, to_padded
from tests.helpers import CLASSIFIER_FAMILIES as FAMILIES
from tests.helpers import classifier_pair

torch.set_num_threads(1)


LENGTHS = (11, 27, 5, 19, 8, 14)


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


def test_not_a_classifier_is_named():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        score_head(model)


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
