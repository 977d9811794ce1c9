"""Padding-free RL with TRL (`packcollate.integrations.trl_rl`): `PackedGRPOTrainer` and `PackedRLOOTrainer`
equal TRL's padded `GRPOTrainer` / `RLOOTrainer` run with the same seed, model and data: the same
completions, the same loss and logged metrics at every step, the same final parameters (fp32, 1e-5
relative), for every loss type, with a reference model, LoRA, accumulation, several iterations, both
importance-sampling levels, entropy masking, masked truncated completions and a token budget.

Tiny random Qwen2 / Llama over the local character tokenizer; the EOS logit is raised (an LM head bias)
so completions end anywhere from 1 token to the cap: a spread, and truncated ones. Nothing is downloaded.
"""

import math

import pytest

trl = pytest.importorskip("trl")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

import packcollate  # noqa: E402,F401
from packcollate.errors import InputError, UnsupportedError  # noqa: E402
from packcollate.integrations.trl import PackedGRPOTrainer, PackedRLOOTrainer  # noqa: E402
from packcollate.tools.toy import arithmetic_problems, char_tokenizer  # noqa: E402

from tests.scripts.two_ranks import launch  # noqa: E402

from ..helpers import lora_config  # noqa: E402

torch.set_num_threads(1)

RTOL = 1e-5
#: Logged values that measure time, not the run.
TIMINGS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
EOS_BIAS = 3.0  # p(EOS) ~ 0.17 per token over the 102-token vocabulary


def tiny_policy(attn_implementation, family="qwen2", seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = Qwen2Config(**common) if family == "qwen2" else LlamaConfig(**common)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    bias = torch.zeros(config.vocab_size)
    bias[config.eos_token_id] = EOS_BIAS
    model.lm_head.bias = torch.nn.Parameter(bias)
    return model


def digits_reward(completions, **kwargs):
    """Rule-based: digits are good, length is not."""
    return [float(sum(ch.isdigit() for ch in c)) - 0.1 * len(c) for c in completions]


def prompts(n=8):
    return datasets.Dataset.from_list([{"prompt": p["prompt"][:24]} for p in arithmetic_problems(n, seed=1)])


def arguments(tmp_path, config_cls=GRPOConfig, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                max_steps=2, learning_rate=0.1, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                seed=0, bf16=False, gradient_checkpointing=False, optim="sgd")
    base.update(overrides)
    return config_cls(**base)


def trained(trainer_cls, attn, tmp_path, family="qwen2", ref=False, lora=False, config_cls=GRPOConfig,
            budget=None, on_forward=None, dtype=torch.float32, **options):
    model = tiny_policy(attn, family).to(dtype)
    if ref:  # TRL builds the reference from the policy's path: a model unlike the policy, saved there
        path = tmp_path / f"reference-{family}"
        tiny_policy(attn, family, seed=1).to(dtype).save_pretrained(path)
        model.config._name_or_path = str(path)
    extra = {} if budget is None else {"max_tokens_per_batch": budget}
    if trainer_cls in (PackedGRPOTrainer, PackedRLOOTrainer):
        extra["check_packing"] = False
    trainer = trainer_cls(model=model, reward_funcs=digits_reward,
                          args=arguments(tmp_path / trainer_cls.__name__, config_cls, **options),
                          train_dataset=prompts(), processing_class=char_tokenizer(),
                          peft_config=lora_config() if lora else None, **extra)
    if on_forward is not None:  # the tokens of every training forward
        trainer.model.register_forward_pre_hook(lambda module, args, kwargs: on_forward(kwargs["input_ids"].numel())
                                                if torch.is_grad_enabled() else None, with_kwargs=True)
    if ref:  # the LM head bias is not part of the saved architecture
        trainer.ref_model.lm_head.bias = torch.nn.Parameter(model.lm_head.bias.detach().clone())
    before = {}
    trainer.add_callback(Snapshot(before))
    trainer.train()
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if n in before}
    return trainer, before, after


class Snapshot(TrainerCallback):
    """The trainable parameters as training starts (LoRA adapters included)."""

    def __init__(self, into: dict):
        self.into = into

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.into.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def assert_same_run(theirs, ours, rtol=RTOL):
    (trainer_t, before, after_t), (trainer_o, _, after_o) = theirs, ours
    assert trainer_o._logs["completion"] == trainer_t._logs["completion"]
    lengths = {len(c) for c in trainer_t._logs["completion"]}
    assert len(lengths) > 2 or max(lengths) <= 2  # a spread of completion lengths (unless capped at 2)
    history_t, history_o = trainer_t.state.log_history, trainer_o.state.log_history
    assert len(history_t) == len(history_o) >= 2
    for step, (logged_t, logged_o) in enumerate(zip(history_t, history_o, strict=True)):
        assert logged_o.keys() == logged_t.keys()
        for key, value in logged_t.items():
            if key in TIMINGS or not isinstance(value, float) or math.isnan(value):
                continue
            assert logged_o[key] == pytest.approx(value, rel=rtol, abs=rtol * 1e-2), (step, key)
    changes = {name: after_t[name] - before[name] for name in after_t}
    # a parameter whose change is tiny (a k_proj moved 1e-4 while the LM head moved 1) is compared at 1% of
    # the largest change: its float32 gradient is a sum that cancels, exact in float64 (measured: 4e-8)
    floor = 0.01 * max((change.norm() for change in changes.values()), default=torch.tensor(0.0))
    assert after_o.keys() == after_t.keys()
    for name in after_t:
        change_t, change_o = changes[name], after_o[name] - before[name]
        assert float((change_o - change_t).norm() / max(change_t.norm(), floor, 1e-30)) < rtol, name
    assert sum(bool(change.norm() > 0) for change in changes.values()) > len(changes) // 2


GRPO_CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),
    "cispo": dict(loss_type="cispo", num_iterations=2),
    "sapo": dict(loss_type="sapo", num_iterations=2),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo", num_iterations=2),
    "grpo-sequence-level": dict(loss_type="grpo", importance_sampling_level="sequence", num_iterations=2),
    "dapo-iterations": dict(loss_type="dapo", num_iterations=2, max_steps=3),
    "grpo-accumulation": dict(loss_type="grpo", gradient_accumulation_steps=2, per_device_train_batch_size=2),
    "dapo-steps-per-generation": dict(loss_type="dapo", steps_per_generation=2, per_device_train_batch_size=2),
    "bnpo-entropy-quantile": dict(loss_type="bnpo", top_entropy_quantile=0.5),
    "dapo-mask-truncated": dict(loss_type="dapo", mask_truncated_completions=True),
    # 2 tokens at most: most completions truncated, some micro-batches with every completion masked out
    "grpo-mask-truncated-short": dict(loss_type="grpo", mask_truncated_completions=True, max_completion_length=2,
                                      per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3),
    "grpo-llama-beta": dict(loss_type="grpo", beta=0.1, family="llama", ref=True),
    "dapo-beta": dict(loss_type="dapo", beta=0.1, ref=True, num_iterations=2),
    "grpo-lora-beta": dict(loss_type="grpo", beta=0.1, lora=True),
}


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_packed_grpo_equals_trl(tmp_path, case):
    options = GRPO_CASES[case]
    theirs = trained(GRPOTrainer, "sdpa", tmp_path, **options)
    ours = trained(PackedGRPOTrainer, "packcollate", tmp_path, **options)
    assert_same_run(theirs, ours)


#: A token budget of 80 splits the 8 rollouts (prompt ~24 + completion <= 12 tokens) into 3-5 pieces.
BUDGET = 80
ONE_MICRO_BATCH = dict(per_device_train_batch_size=8, steps_per_generation=1, gradient_accumulation_steps=1)
BUDGET_CASES = {
    **{loss: dict(loss_type=loss) for loss in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo")},
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "grpo-sequence-iterations": dict(loss_type="grpo", importance_sampling_level="sequence", num_iterations=2),
    "dapo-entropy-bonus-quantile": dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.5),
    "bnpo-beta": dict(loss_type="bnpo", beta=0.1, ref=True),
    "dr_grpo-lora-beta": dict(loss_type="dr_grpo", beta=0.1, lora=True),
    "dapo-accumulation": dict(loss_type="dapo", per_device_train_batch_size=4, gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("case", list(BUDGET_CASES))
def test_token_budget_equals_trl_unsplit(tmp_path, case):
    """Token-budget pieces (several forwards and backwards per micro-batch) == TRL's one padded forward.

    In float64 (to 1e-6: TRL's log-prob kernel rounds to float32 inside, and the pieces' gradients add
    up in another order than the padded batch's; float32 runs agree to 2e-5, an approximation of any
    loss type's normalisation would be off by 1e-2 or more)."""
    options = {**ONE_MICRO_BATCH, **BUDGET_CASES[case], "dtype": torch.float64}
    theirs = trained(GRPOTrainer, "sdpa", tmp_path, **options)
    forwards = []
    ours = trained(PackedGRPOTrainer, "packcollate", tmp_path, budget=BUDGET, on_forward=forwards.append, **options)
    assert_same_run(theirs, ours, rtol=1e-6)
    assert max(forwards) <= BUDGET and len(forwards) > 2 * ours[0].state.global_step  # really split


RLOO_CASES = {  # RLOOConfig's default beta is 0.05: a reference
    "default": dict(ref=True),
    "no-reference": dict(beta=0.0),
    "iterations": dict(beta=0.0, num_iterations=2, max_steps=3),
    "accumulation": dict(ref=True, gradient_accumulation_steps=2, per_device_train_batch_size=2),
    "steps-per-generation": dict(beta=0.0, steps_per_generation=2, per_device_train_batch_size=2),
    "mask-truncated-normalized": dict(beta=0.0, mask_truncated_completions=True, normalize_advantages=True),
    "beta": dict(beta=0.1, ref=True, family="llama"),
    "lora-beta": dict(beta=0.1, lora=True),
}


@pytest.mark.parametrize("case", list(RLOO_CASES))
def test_packed_rloo_equals_trl(tmp_path, case):
    options = {"config_cls": RLOOConfig, **RLOO_CASES[case]}
    theirs = trained(RLOOTrainer, "sdpa", tmp_path, **options)
    ours = trained(PackedRLOOTrainer, "packcollate", tmp_path, **options)
    assert_same_run(theirs, ours)


@pytest.mark.parametrize("case", ["no-reference", "beta", "lora-beta"])
def test_packed_rloo_token_budget_equals_trl_unsplit(tmp_path, case):
    options = {"config_cls": RLOOConfig, **ONE_MICRO_BATCH, **RLOO_CASES[case], "dtype": torch.float64}
    theirs = trained(RLOOTrainer, "sdpa", tmp_path, **options)
    forwards = []
    ours = trained(PackedRLOOTrainer, "packcollate", tmp_path, budget=BUDGET, on_forward=forwards.append, **options)
    assert_same_run(theirs, ours, rtol=1e-6)
    assert max(forwards) <= BUDGET and len(forwards) > 2 * ours[0].state.global_step


class Run:
    """A saved run of `tests/scripts/grpo_two_ranks.py`, read like a trained trainer by `assert_same_run`."""

    def __init__(self, saved: dict):
        self._logs = {"completion": saved["completions"]}
        self.state = type("State", (), {"log_history": saved["history"]})()
        self.forwards = saved["forwards"]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "rloo"])
def test_two_ranks_packed_and_token_budget_equal_trl(tmp_path, free_port, loss_type):
    """2 gloo ranks: TRL's padded GRPOTrainer (RLOOTrainer for "rloo"), the packed trainer, and the packed
    trainer with a token budget (several pieces per rank, the last one's backward syncing the gradients):
    the same run (float64)."""
    out = tmp_path / "runs.pt"
    launch("grpo_two_ranks.py", str(out), loss_type, port=free_port)
    runs = torch.load(out)
    as_run = {name: (Run(saved), saved["before"], saved["after"]) for name, saved in runs.items()}
    assert len(runs["trl"]["completions"]) == 8  # both ranks' completions, gathered
    assert_same_run(as_run["trl"], as_run["packed"], rtol=1e-6)
    assert_same_run(as_run["trl"], as_run["budget"], rtol=1e-6)
    assert max(runs["budget"]["forwards"]) <= 50 < max(runs["packed"]["forwards"])


def short_reward(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def nan_reward(completions, **kwargs):
    return [float("nan") if i == 1 else 1.0 for i in range(len(completions))]


def none_reward(completions, **kwargs):
    return [None if i == 1 else float(len(c)) for i, c in enumerate(completions)]


def bad_input_trainer(tmp_path, reward=digits_reward, budget=None, trainer_cls=PackedGRPOTrainer):
    config_cls = GRPOConfig if trainer_cls is PackedGRPOTrainer else RLOOConfig
    return trainer_cls(model=tiny_policy("packcollate"), reward_funcs=reward, args=arguments(tmp_path, config_cls, beta=0.0),
                       train_dataset=prompts(), processing_class=char_tokenizer(), check_packing=False,
                       max_tokens_per_batch=budget)


def assert_refused(trainer, match):
    with pytest.raises(InputError, match=match) as caught:
        trainer.train()
    assert "\n" not in str(caught.value)
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("trainer_cls", [PackedGRPOTrainer, PackedRLOOTrainer])
def test_reward_function_with_the_wrong_count_is_refused(tmp_path, trainer_cls):
    trainer = bad_input_trainer(tmp_path, short_reward, trainer_cls=trainer_cls)
    assert_refused(trainer, r"^reward function 'short_reward': expected 4 rewards \(one per completion\), got 3$")


def test_nan_reward_is_refused_and_none_stays_not_applicable(tmp_path):
    assert_refused(bad_input_trainer(tmp_path, nan_reward),
                   r"^reward function 'nan_reward', completion 1: expected a finite number or None .*, got nan$")
    trainer = bad_input_trainer(tmp_path, [none_reward, digits_reward])  # None: TRL's "this function does not apply"
    trainer.train()
    assert trainer.state.global_step == 2


def test_empty_completion_is_refused(tmp_path, monkeypatch):
    generate = GRPOTrainer._generate

    def one_empty(self, prompts):
        prompt_ids, completion_ids, *rest = generate(self, prompts)
        return (prompt_ids, [[] if i == 2 else ids for i, ids in enumerate(completion_ids)], *rest)

    monkeypatch.setattr(GRPOTrainer, "_generate", one_empty)
    assert_refused(bad_input_trainer(tmp_path), r"^completion 2 \(prompt .*\): expected at least one token, got an empty")


def test_rollout_longer_than_the_budget_is_refused(tmp_path):
    assert_refused(bad_input_trainer(tmp_path, budget=20),
                   r"^rollout \d+: expected at most max_tokens_per_batch=20 tokens \(prompt \+ completion\), got \d+")


def test_token_budget_with_dropout_is_refused(tmp_path):
    model = tiny_policy("packcollate")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(UnsupportedError, match=r"max_tokens_per_batch runs each piece's forward twice .* dropout "
                                               r"\(model.layers.0.self_attn\)"):
        PackedGRPOTrainer(model=model, reward_funcs=digits_reward, args=arguments(tmp_path, disable_dropout=False),
                          train_dataset=prompts(), processing_class=char_tokenizer(), max_tokens_per_batch=100)


@pytest.mark.parametrize("split", ["sp", "cp"])
def test_sequence_or_context_parallelism_is_refused(split):
    """Rollouts are packed whole on each rank: an attention that expects a shard of the row would mix them."""
    from types import SimpleNamespace

    from packcollate.integrations.trl_rl import refuse_split_sequences

    config = SimpleNamespace(sp_enabled=split == "sp", cp_enabled=split == "cp")
    trainer = SimpleNamespace(accelerator=SimpleNamespace(parallelism_config=config))
    with pytest.raises(UnsupportedError, match=f"expected no sequence or context parallelism .* {split}_size > 1"):
        refuse_split_sequences(trainer)
    refuse_split_sequences(SimpleNamespace(accelerator=SimpleNamespace(parallelism_config=None)))
