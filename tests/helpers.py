"""Builders the test modules share: example batches, tiny models, trainer arguments, the console script's output.

One section per layer of the package; a test module imports what it uses (`from tests.helpers import ...`),
and the subprocess workers under tests/scripts/ import the tiny Trainer setup from here too. What only one
test module uses stays in that module; fixtures are in conftest.py.
"""

from __future__ import annotations

import logging
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    TrainerCallback,
    TrainingArguments,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import packcollate
from packcollate import PackedCollator, PaddedCollator
from packcollate.backend.attention import packcollate_attention
from packcollate.batching.sampler import TokenBudgetBatchSampler
from packcollate.compat import tiny_config
from packcollate.compat.vision import tiny_vision_config, tiny_vision_model
from packcollate.tools.toy import arithmetic_problems, char_tokenizer

# ---------------------------------------------------------------------------------------------
# The text collators (collate/)
# ---------------------------------------------------------------------------------------------


IGNORE = -100

# Three examples of lengths 3, 2, 4: N = 9, cu_seq_lens = [0, 3, 5, 9], max length 4.
FEATURES = [
    {"input_ids": [11, 12, 13]},
    {"input_ids": [21, 22]},
    {"input_ids": [31, 32, 33, 34]},
]
IDS = [11, 12, 13, 21, 22, 31, 32, 33, 34]
POSITIONS = [0, 1, 2, 0, 1, 0, 1, 2, 3]
CU = [0, 3, 5, 9]


def to_numpy(batch: dict) -> dict:
    """The batch with tensors as numpy arrays (other values unchanged), for easy comparison."""
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def row(batch: dict, key: str) -> list:
    """The single packed row of `key` as a list."""
    value = to_numpy(batch)[key]
    assert value.shape[0] == 1
    return value[0].tolist()


def assert_batches_equal(a: dict, b: dict) -> None:
    """Same keys, same types, same dtypes, same values."""
    assert a.keys() == b.keys()
    for key in a:
        assert type(a[key]) is type(b[key]), key
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "packcollate" and r.levelno == logging.WARNING]


GOOD = {"input_ids": [1, 2, 3]}


def raises(features, error, *fragments, collator=None, **options):
    """Call the collator(s) on `features`; assert `error` and that the message holds every fragment.

    Both collators validate the same way, so both are checked (unless a specific collator is given).
    """
    collators = [collator] if collator is not None else [PackedCollator(**options), PaddedCollator(**options)]
    messages = []
    for c in collators:
        with pytest.raises(error) as info:
            c(features)
        message = str(info.value.args[0]) if info.value.args else str(info.value)
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        # ours, not a numpy/torch error surfacing from inside: it starts by naming the example (or batch)
        assert re.match(r"(example \d+|every example|expected)", message), message
        messages.append(message)
    return messages[0]


COLLATORS = [PackedCollator, PaddedCollator]


# ---------------------------------------------------------------------------------------------
# Token-budget batches (batching/)
# ---------------------------------------------------------------------------------------------


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def flan_like(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(120), 0.9, n)), 1, 1024).astype(np.int64)


def all_ranks(lengths, max_tokens, num_replicas, **kwargs) -> list[list[list[int]]]:
    """The batches of every rank, one sampler per rank as in a real DDP job."""
    return [
        list(TokenBudgetBatchSampler(lengths, max_tokens, num_replicas=num_replicas, rank=rank, **kwargs))
        for rank in range(num_replicas)
    ]


# ---------------------------------------------------------------------------------------------
# The attention backend called directly, and tiny models on it (backend/)
# ---------------------------------------------------------------------------------------------


HEADS, DIM = 2, 8
HEADS, DIM = 2, 8


class _Layer(torch.nn.Module):
    is_causal = True


LAYER = _Layer().eval()


def qkv(batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, seq, DIM, generator=g) for _ in range(3)]


def call(q, k, v, mask=None, **kwargs):
    return packcollate_attention(LAYER, q, k, v, mask, **kwargs)[0]


def tiny_backend_model(model_type: str, attn_implementation: str = "packcollate", **overrides):
    """A tiny random copy of `model_type` (its default config, shrunk) on the packcollate backend, in eval mode."""
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# families that pick an attention class by backend name when built, and know only their own
BUILT_WITH_THEIR_OWN_ATTENTION = ("gpt_neo",)


def build_prepared(model_type: str, attn_implementation: str = "packcollate", **overrides) -> torch.nn.Module:
    """A tiny copy of a recurrent / hybrid / internal-attention family, `packcollate.prepare`d (skipped when this
    transformers does not have the family)."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {packcollate.__version__} has no {model_type!r}")
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    if model_type in BUILT_WITH_THEIR_OWN_ATTENTION and attn_implementation == "packcollate":
        model = AutoModelForCausalLM.from_config(config).eval()
        return packcollate.prepare(model, attn_implementation="packcollate")
    return packcollate.prepare(AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval())


# ---------------------------------------------------------------------------------------------
# Tiny models for the proof and the guard (compat/), sequence classifiers (objectives/)
# ---------------------------------------------------------------------------------------------


def tiny_eager_model(model_type: str, attn_implementation: str = "eager", **overrides):
    """The same tiny copy on transformers' eager attention by default: what the static checks and the guard read."""
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


CLASSIFIER_FAMILIES = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "mistral"]


def classifier_pair(model_type, num_labels=1, pad_token_id=0, dtype=torch.float64):
    """(padded eager model, packcollate model) with the same weights."""
    config = tiny_config(model_type, num_labels=num_labels, pad_token_id=pad_token_id, use_cache=False)
    torch.manual_seed(0)
    padded = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").to(dtype)
    packed = AutoModelForSequenceClassification.from_config(config, attn_implementation="packcollate").to(dtype)
    packed.load_state_dict(padded.state_dict())
    return padded.eval(), packed.eval()


# ---------------------------------------------------------------------------------------------
# Vision-language models (collate/test_vision.py, compat/test_vision.py)
# ---------------------------------------------------------------------------------------------


_VISION_MODELS: dict = {}


def vision_model(family: str, backend: str = "packcollate"):
    """A tiny random copy of a vision-language `family`, built once per test session, on `backend`."""
    if family not in _VISION_MODELS:
        _VISION_MODELS[family] = tiny_vision_model(family)
    _VISION_MODELS[family].set_attn_implementation(backend)
    return _VISION_MODELS[family]


def gemma3_with_window(window: int):
    from transformers import AutoModelForImageTextToText

    config = tiny_vision_config("gemma3")
    config.get_text_config().sliding_window = window
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, attn_implementation="packcollate").float().eval()


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer on a tiny Llama (integrations/, scripts/)
# ---------------------------------------------------------------------------------------------


N_EXAMPLES = 16


def tiny_model(attn_implementation="packcollate"):
    """The tiny random Llama the Trainer tests train (vocabulary 128, 2 layers, GQA; CPU, fp32)."""
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


# ---------------------------------------------------------------------------------------------
# Sequence parallelism (integrations/test_sequence_parallel.py, scripts/sequence_parallel_step.py)
# ---------------------------------------------------------------------------------------------

#: Two packed rows: 33 tokens (odd: 2 ranks get 16 and 17; the 12-token example spans tokens 7-18 and so
#: the shard edge at 16), and 40 tokens with a one-token example.
SEQUENCE_PARALLEL_LENGTHS = ([7, 12, 5, 9], [10, 1, 16, 13])


def sequence_parallel_rows(vocab: int = 128) -> list[dict]:
    """The packed rows of `SEQUENCE_PARALLEL_LENGTHS` (`PackedCollator`; a third of each example a prompt)."""
    rng = np.random.default_rng(3)
    rows = []
    for lengths in SEQUENCE_PARALLEL_LENGTHS:
        examples = [{"input_ids": rng.integers(3, vocab, n).tolist(),
                     "completion_mask": [0] * (n // 3) + [1] * (n - n // 3)} for n in lengths]
        rows.append(PackedCollator()(examples))
    return rows


def sequence_parallel_case(case: str):
    """(model, rows, loss_weighting) of a sequence-parallel case: `llama_gqa` (4 heads, 2 K/V heads),
    `llama_mqa` (1 K/V head: repeated over the ranks), `qwen2_sequence` (Qwen2, sequence-weighted loss),
    `llama_checkpointed` (the GQA Llama, gradient checkpointing on). fp32, seeded, packcollate backend."""
    kv = 1 if case == "llama_mqa" else 2
    model_type = "qwen2" if case.startswith("qwen2") else "llama"
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type](vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="packcollate")
    return model, sequence_parallel_rows(), "sequence" if case.endswith("sequence") else "token"


def long_prompt_eval_set():
    """8 eval examples of 300 tokens every 4th (prompt 100 tokens): cut at 64, two have no target left."""
    return prompt_completion_dataset(n=8, seed=1, long_every=4)


def padded_reference_change(dataset, model=None):
    """-grad of mean_e(mean token loss of e), one example at a time (the padded rows' per-row mean)."""
    model = model or tiny_model("eager")
    per_example = []
    for ids, mask in zip(dataset["input_ids"], dataset["completion_mask"]):
        ids = torch.tensor(ids)
        labels = ids.masked_fill(torch.tensor(mask) == 0, -100)
        per_example.append(model(input_ids=ids[None], labels=labels[None]).loss)
    loss = torch.stack(per_example).mean()
    loss.backward()
    return {n: -p.grad.detach().clone() for n, p in model.named_parameters()}, loss.item()


def summed_loss_change(dataset, divisor: int, model=None) -> dict:
    """-grad of (summed token loss over every target of `dataset`) / `divisor`, one example at a time: the step of
    open-instruct's `--reduce_loss sum` over accumulation x ranks = `divisor`."""
    model = model or tiny_model("eager")
    for ids, mask in zip(dataset["input_ids"], dataset["completion_mask"]):
        ids = torch.tensor(ids)
        labels = ids.masked_fill(torch.tensor(mask) == 0, -100)
        logits = model(input_ids=ids[None]).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels[1:], ignore_index=-100, reduction="sum")
        (nll / divisor).backward()
    return {n: -p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same_change_within_an_ulp(expected, got):
    """Changes read back from float32 weights (`new - old`) are exact to one ulp of the weight: that
    much absolute slack per element, plus 1e-5 of the parameter's largest change."""
    weights = dict(tiny_model().named_parameters())
    for name in expected:
        ulp = torch.finfo(torch.float32).eps * weights[name].detach().abs()
        error = (got[name] - expected[name]).abs()
        assert (error <= ulp + 1e-5 * expected[name].abs().max()).all(), (name, error.max().item())


# ---------------------------------------------------------------------------------------------
# LoRA (PEFT) on the tiny Llama
# ---------------------------------------------------------------------------------------------


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]


def lora_config():
    """LoRA on the tiny Llama's projections (the tests that use it skip without peft)."""
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: B is random too, so A gets a non-zero gradient at the first step
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False)


def lora_model(attn_implementation="packcollate"):
    peft = pytest.importorskip("peft")
    model = tiny_model(attn_implementation)
    torch.manual_seed(1)
    return peft.get_peft_model(model, lora_config())


class CaptureGradients(TrainerCallback):
    """{name: gradient} of the trainable parameters just before the first optimizer step."""

    def __init__(self):
        self.gradients = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.gradients:
            self.gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def adapter_gradients(trainer) -> dict:
    """Train one step; the LoRA weights' gradients."""
    capture = CaptureGradients()
    trainer.add_callback(capture)
    trainer.train()
    assert capture.gradients and all("lora_" in n for n in capture.gradients)
    return capture.gradients


def adapter_change(trainer_cls, tmp_path, model, **kwargs) -> dict:
    return adapter_gradients(trainer_cls(model=model, **kwargs))


def assert_same_adapter_change(a: dict, b: dict, rtol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert float(a[name].norm()) > 0, name  # the gradient reached this adapter
        assert float((a[name] - b[name]).norm() / a[name].norm()) < rtol, name


# ---------------------------------------------------------------------------------------------
# TRL's SFTTrainer on a tiny Llama with a character tokenizer
# ---------------------------------------------------------------------------------------------


def tiny_chat_model():
    """A tiny random Llama over the character tokenizer's vocabulary (`packcollate.tools.toy.char_tokenizer`)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="packcollate")


def prompt_completion(n=24):
    return datasets.Dataset.from_list(arithmetic_problems(n, seed=3))


STEPS = 3


def trl_config(tmp_path, **overrides):
    from trl import SFTConfig  # trl is optional: only its tests call this

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=1e-3,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, max_length=None,
                shuffle_dataset=False)
    base.update(overrides)
    return SFTConfig(**base)


def losses(trainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------
# The console script (tools/): its own stderr lines, on a terminal, with remote code
# ---------------------------------------------------------------------------------------------


#: Notes that are not the command's: the `kernels` package (imported by transformers >= 5.25 with any
#: model file) says once per hub kernel, in offline mode, that it skips that kernel's publisher check.
FOREIGN_NOTES = ("Skipping publisher trust check for ",)


def own_lines(stderr: str) -> list[str]:
    """The lines a `packcollate` command wrote to stderr itself: the non-blank lines that are not `FOREIGN_NOTES`."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(FOREIGN_NOTES)]
EVIL_MODULE = '''
import os, pathlib
pathlib.Path(os.environ["PACKCOLLATE_MARKER"]).write_text("remote code ran")
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from transformers import LlamaConfig


class EvilTokenizer(TokenizersBackend):
    pass


class EvilConfig(LlamaConfig):
    model_type = "evil"
'''


def console_script() -> list[str]:
    script = shutil.which("packcollate")
    return [script] if script else [sys.executable, "-m", "packcollate.tools.cli"]


def console_env(marker: Path) -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PACKCOLLATE_MARKER": str(marker), "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def run_on_pty(args: list[str], marker: Path, answer: bytes = b"y\n", timeout: float = 120) -> tuple[int, str]:
    """Run the console script with a pseudo-terminal as stdin/stdout/stderr, answering every prompt."""
    master, slave = pty.openpty()
    process = subprocess.Popen(console_script() + args, stdin=slave, stdout=slave, stderr=slave, env=console_env(marker),
                               close_fds=True)
    os.close(slave)
    output, deadline, answered = b"", time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if output.count(b"[y/N]") > answered:
                answered += 1
                os.write(master, answer)
        elif process.poll() is not None:
            break
    process.wait(timeout=10)
    os.close(master)
    return process.returncode, output.decode(errors="replace")
