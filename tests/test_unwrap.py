"""`unwrap_model` (`packcollate.unwrap`): the transformers model inside the wrappers users train — PEFT,
torch.compile, DataParallel, DDP, and FSDP2's `fully_shard`, which swaps the class for `FSDP<Name>`."""

import pytest

peft = pytest.importorskip("peft")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

import packcollate  # noqa: E402,F401
from packcollate.compat import assert_packing_safe  # noqa: E402
from packcollate.unwrap import unwrap_model, unwrapped_class  # noqa: E402
from tests.helpers import lora_config, tiny_model  # noqa: E402


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
