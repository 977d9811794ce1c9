"""`unwrap_model`: the transformers model inside the wrappers users train.

Training code rarely hands over the bare `PreTrainedModel`: PEFT wraps it in a `PeftModel`
(`get_base_model()`), `torch.compile` in an `OptimizedModule` (`_orig_mod`), DDP / FSDP1 /
`DataParallel` / DeepSpeed / accelerate in a module holding it as `.module`, and FSDP2's
`fully_shard` swaps its class for a subclass `FSDP<Name>` of `FSDPModule` and the original class.
Everything that reads a model's class or config (the packing guard, `check_model`) goes through
these two functions, so every wrapper, nested in any order, is seen through.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

#: Attributes under which a wrapper holds the module it wraps, in the order they are tried
#: (`_orig_mod`: torch.compile; `module`: DDP, FSDP1, DataParallel, DeepSpeed, accelerate).
WRAPPED_ATTRIBUTES = ("_orig_mod", "module")


def _inner(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module `model` wraps, or None when it is not a wrapper."""
    if isinstance(model, PreTrainedModel):
        return None
    get_base_model = getattr(type(model), "get_base_model", None)  # PEFT's PeftModel (on the class: no __getattr__)
    if callable(get_base_model):
        inner = model.get_base_model()
        return inner if inner is not model else None
    for name in WRAPPED_ATTRIBUTES:
        inner = model._modules.get(name)
        if isinstance(inner, torch.nn.Module):
            return inner
    return None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost module of `model` (a `PreTrainedModel` for transformers models), through any
    nesting of PEFT, torch.compile, DDP, FSDP, DataParallel, DeepSpeed and accelerate wrappers.

    The model's own parameters (LoRA layers included) stay where they are: nothing is copied.
    """
    while (inner := _inner(model)) is not None:
        model = inner
    return model


def unwrapped_class(model: torch.nn.Module) -> type:
    """The class of `unwrap_model(model)`, with FSDP2's `FSDP<Name>` subclass mapped back to `<Name>`."""
    cls = type(unwrap_model(model))
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return cls
    if issubclass(cls, FSDPModule):
        return next(base for base in cls.__mro__ if not issubclass(base, FSDPModule))
    return cls
