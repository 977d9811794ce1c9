"""Padding-free preference training with TRL (`packcollate.integrations.trl_preference`): `PackedDPOTrainer` and
`PackedRewardTrainer`.

`PackedDPOTrainer` (chosen and rejected packed into one row) equals TRL's padded `DPOTrainer` on
the same data: loss, rewards and every logged metric, and the gradients (CPU, tiny Llama).

In float64 the two agree to 1e-10 (the packed path is exact; only float rounding differs). In
float32 the loss, log-probs, metrics and gradients agree to a relative 1e-5; the rewards are
`beta * (policy_logps - ref_logps)`, a difference of two sums of ~100 log-probs (|sum| ~ 200): they
agree to `beta * 1e-5 * |logps|` absolute, the rounding of those sums, not to 1e-5 of their
(small) difference.

`PackedRewardTrainer` equals TRL's `RewardTrainer`: loss, metrics and gradients (float64).

Local character tokenizer, tiny random models: nothing is downloaded.
"""

import pytest

trl = pytest.importorskip("trl")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
)
from trl import DPOConfig, DPOTrainer  # noqa: E402

import packcollate  # noqa: E402,F401
from packcollate.collate.preference import PackedPairCollator, PackedPreferenceCollator  # noqa: E402
from packcollate.compat import tiny_config  # noqa: E402
from packcollate.integrations.trl import PackedDPOTrainer  # noqa: E402
from packcollate.tools.toy import arithmetic_problems, char_tokenizer  # noqa: E402

torch.set_num_threads(1)


PAIRS = 6
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins")


def tiny_model(attn_implementation, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def preference_pairs(n=PAIRS, seed=5):
    """Arithmetic problems: the worked answer is chosen, a shortened or wrong one rejected (uneven lengths)."""
    rows = []
    for i, p in enumerate(arithmetic_problems(n, seed=seed)):
        rejected = p["completion"][: len(p["completion"]) // 2] if i % 2 else "The answer is 7." * (1 + i % 3)
        rows.append({"prompt": p["prompt"], "chosen": " " + p["completion"], "rejected": " " + rejected})
    return datasets.Dataset.from_list(rows)


def config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=PAIRS, max_steps=2, learning_rate=1e-2,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                max_length=None)  # beta: TRL's default, 0.1
    base.update(overrides)
    return DPOConfig(**base)


def trainer_pair(tmp_path, peft_config=None, dtype=torch.float64, **options):
    """(TRL's DPOTrainer on sdpa with padding, PackedDPOTrainer on the packcollate backend), same weights."""
    made = []
    for cls, attn in ((DPOTrainer, "sdpa"), (PackedDPOTrainer, "packcollate")):
        extra = {} if cls is DPOTrainer else {"check_packing": False}
        ref = None if peft_config is not None else tiny_model(attn, seed=1)  # a reference unlike the policy
        made.append(cls(model=tiny_model(attn), ref_model=ref, args=config(tmp_path / cls.__name__, **options),
                        train_dataset=preference_pairs(), processing_class=char_tokenizer(), peft_config=peft_config,
                        **extra))
    for trainer in made:
        trainer.model.to(dtype)
        if trainer.ref_model is not None:
            trainer.ref_model.to(dtype)
    return made


def loss_metrics_grads(trainer, collator=None):
    model = trainer.model
    model.train()
    examples = [trainer.train_dataset[i] for i in range(min(PAIRS, len(trainer.train_dataset)))]
    assert len(examples) >= 3
    batch = (collator or trainer.data_collator)(examples)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, grads, batch


def assert_same(theirs, ours, dtype=torch.float64, beta=0.1):
    (loss_t, metrics_t, grads_t, _), (loss_o, metrics_o, grads_o, batch) = theirs, ours
    rtol = RTOL[dtype]
    assert "cu_seq_lens_q" in batch and "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    torch.testing.assert_close(loss_o, loss_t, rtol=rtol, atol=rtol * 1e-2)
    assert metrics_o.keys() == metrics_t.keys()
    logps = max(abs(metrics_t["logps/chosen"]), abs(metrics_t["logps/rejected"]))
    for key in metrics_t:
        atol = beta * rtol * logps if key in REWARD_METRICS else rtol * 1e-1
        assert metrics_o[key] == pytest.approx(metrics_t[key], rel=rtol, abs=atol), key
    assert grads_o.keys() == grads_t.keys() and grads_t
    for name in grads_t:
        # TRL's chunked log-prob kernel sums the LM head's gradient in float32 whatever the model's
        # dtype (3.7e-7 relative between two float64 runs, measured): float32 tolerance there
        tol = max(rtol, RTOL[torch.float32]) if "lm_head" in name else rtol
        scale = grads_t[name].abs().max().item()
        torch.testing.assert_close(grads_o[name], grads_t[name], rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("options", [
    {"loss_type": ["sigmoid"]},
    {"loss_type": ["ipo"]},
    {"loss_type": ["hinge"]},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [1.0, 0.5, 0.2]},
    {"loss_type": ["sigmoid"], "max_length": 60, "truncation_mode": "keep_end"},
    {"loss_type": ["sigmoid"], "max_length": 120},
    {"loss_type": ["sigmoid_norm", "robust"], "use_weighting": True, "ld_alpha": 0.5, "label_smoothing": 0.1},
], ids=["sigmoid", "ipo", "hinge", "mixed", "keep_end", "keep_start", "wpo-ld-alpha"])
def test_loss_metrics_gradients_equal_padded_dpo(tmp_path, options):
    theirs, ours = trainer_pair(tmp_path, **options)
    assert isinstance(ours.data_collator, PackedPreferenceCollator)
    assert_same(loss_metrics_grads(theirs), loss_metrics_grads(ours))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_float32_within_1e5(tmp_path, loss_type):
    theirs, ours = trainer_pair(tmp_path, dtype=torch.float32, loss_type=[loss_type])
    assert_same(loss_metrics_grads(theirs), loss_metrics_grads(ours), dtype=torch.float32)


def test_lora_reference_is_adapters_off(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           lora_dropout=0.0)
    theirs, ours = trainer_pair(tmp_path, peft_config=lora)
    result_t, result_o = loss_metrics_grads(theirs), loss_metrics_grads(ours)
    assert_same(result_t, result_o)
    assert all("lora" in name for name in result_o[2])
    assert abs(result_o[1]["rewards/margins"]) > 1e-4  # the adapters move the policy away from the reference


def test_training_steps_match_and_token_budget_runs(tmp_path):
    theirs, ours = trainer_pair(tmp_path, per_device_train_batch_size=3)
    history = []
    for trainer in (theirs, ours):
        trainer.train()
        history.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(history[1]) == 2 and history[1] == pytest.approx(history[0], rel=1e-5)
    evaluated = [trainer.evaluate(preference_pairs(4, seed=11)) for trainer in (theirs, ours)]
    assert evaluated[1]["eval_loss"] == pytest.approx(evaluated[0]["eval_loss"], rel=1e-5)
    assert evaluated[1]["eval_rewards/accuracies"] == evaluated[0]["eval_rewards/accuracies"]

    budget = PackedDPOTrainer(model=tiny_model("packcollate"), ref_model=tiny_model("packcollate", seed=1),
                              args=config(tmp_path / "budget"), train_dataset=preference_pairs(),
                              processing_class=char_tokenizer(), max_tokens_per_batch=400)
    loader = budget.get_train_dataloader()
    rows = [batch["input_ids"].shape[1] for batch in loader]
    assert sum(rows) == sum(budget.train_dataset["length"]) and len(rows) > 1
    assert all(n <= 400 for n in rows) or max(budget.train_dataset["length"]) > 400
    budget.train()  # the packing guard runs at train start (check_packing default)
    assert budget.state.global_step == 2


def test_precomputed_reference_log_probs(tmp_path):
    """TRL precomputes the reference at init (float32, its padded collator); training batches are packed."""
    theirs, ours = trainer_pair(tmp_path, dtype=torch.float32, precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in ours.train_dataset.column_names
    assert_same(loss_metrics_grads(theirs), loss_metrics_grads(ours), dtype=torch.float32)
    # a reference forward on a packed batch gives what TRL's padded precompute stored
    examples = [ours.train_dataset[i] for i in range(PAIRS)]
    chosen, rejected = ours.compute_ref_log_probs(ours.ref_model or ours.model, ours.data_collator(examples))
    for computed, key in ((chosen, "ref_chosen_logps"), (rejected, "ref_rejected_logps")):
        torch.testing.assert_close(computed, torch.tensor(ours.train_dataset[key][:PAIRS]), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# TRL's RewardTrainer
# ---------------------------------------------------------------------------------------------


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
