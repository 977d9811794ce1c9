"""Models as users train them: LoRA (PEFT), torch.compile, DDP / DataParallel wrappers.

The packing guard and `check_model` see through every wrapper (`packcollate.unwrap`), and
LoRA training through `PackedTrainer` / `PackedSFTTrainer` gives the padded adapter gradients
(tiny random Llama, CPU, fp32; the gradients of the first optimizer step, read just before it).
"""

import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import packcollate  # noqa: E402,F401
from packcollate import PaddedCollator  # noqa: E402
from packcollate.compat import assert_packing_safe, check_model  # noqa: E402
from packcollate.unwrap import unwrap_model, unwrapped_class  # noqa: E402
from packcollate.integrations import PackedTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer_integration import arguments, prompt_completion_dataset, tiny_model  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]


def lora_config() -> LoraConfig:
    # init_lora_weights=False: B is random too, so A gets a non-zero gradient at the first step
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False)


def lora_model(attn_implementation="packcollate"):
    model = tiny_model(attn_implementation)
    torch.manual_seed(1)
    return get_peft_model(model, lora_config())


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


def assert_same_change(a: dict, b: dict, rtol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert float(a[name].norm()) > 0, name  # the gradient reached this adapter
        assert float((a[name] - b[name]).norm() / a[name].norm()) < rtol, name


@pytest.fixture(scope="module")
def padded_lora_change(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("padded-lora")
    return adapter_change(Trainer, tmp, lora_model("sdpa"), args=arguments(tmp, remove_unused_columns=False),
                          train_dataset=prompt_completion_dataset(), data_collator=PaddedCollator(passthrough_keys=["idx"]))


# --- the wrappers ------------------------------------------------------------------------------


def test_unwrap_sees_through_nested_wrappers():
    model = tiny_model()
    lora = get_peft_model(model, lora_config())
    wrapped = torch.nn.DataParallel(torch.compile(lora, backend="eager"))
    assert unwrap_model(wrapped) is model and unwrap_model(model) is model
    assert unwrapped_class(wrapped) is type(model)


def test_unwrap_sees_through_ddp_and_fsdp2(free_port):
    """DDP around a PeftModel; FSDP2's fully_shard, which swaps the class for FSDPLlamaForCausalLM."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1)
    try:
        model = tiny_model()
        ddp = torch.nn.parallel.DistributedDataParallel(get_peft_model(model, lora_config()))
        assert unwrap_model(ddp) is model
        assert_packing_safe(ddp)
        sharded = fully_shard(tiny_model())
        assert type(sharded).__name__ == "FSDPLlamaForCausalLM" and unwrapped_class(sharded) is type(model)
        assert_packing_safe(sharded)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["peft", "compile"])
def test_guard_proves_wrapped_models(wrap):
    """Exact setups pass; a contaminating one (sdpa with a cache) is still refused through the wrapper."""

    def wrapped(attn):
        model = tiny_model(attn)
        return get_peft_model(model, lora_config()) if wrap == "peft" else torch.compile(model, backend="eager")

    assert_packing_safe(wrapped("packcollate"), use_cache=True)
    with pytest.raises(RuntimeError, match="packed batches are not safe for LlamaForCausalLM with attn_implementation='sdpa'"):
        assert_packing_safe(wrapped("sdpa"), use_cache=True)


def test_check_model_of_a_peft_model():
    report = check_model(lora_model(), backends=["packcollate"])
    assert report.architecture == "LlamaForCausalLM"
    assert report.ok_for("packcollate", use_cache=True)


# --- LoRA training -----------------------------------------------------------------------------


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lora_packed_trainer_equals_padded(padded_lora_change, tmp_path, gradient_checkpointing):
    """PackedTrainer on a PeftModel (guard on): the adapters get the padded gradients, with and
    without gradient checkpointing."""
    args = arguments(tmp_path, gradient_checkpointing=gradient_checkpointing)
    change = adapter_change(PackedTrainer, tmp_path, lora_model(), args=args, train_dataset=prompt_completion_dataset())
    assert_same_change(padded_lora_change, change)


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


# --- torch.compile -----------------------------------------------------------------------------


def test_packed_trainer_trains_a_compiled_model(tmp_path):
    """PackedTrainer(model=torch.compile(m)): the guard sees the Llama inside; the step equals eager."""
    dataset = prompt_completion_dataset()
    eager = tiny_model()
    compiled = tiny_model()
    before = {n: p.detach().clone() for n, p in eager.named_parameters()}
    for model in (eager, torch.compile(compiled, backend="aot_eager", dynamic=True)):
        PackedTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset,
                      optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None)).train()
    for name, param in compiled.named_parameters():
        change, reference = param.detach() - before[name], dict(eager.named_parameters())[name].detach() - before[name]
        assert float((change - reference).norm() / reference.norm()) < 1e-5, name
