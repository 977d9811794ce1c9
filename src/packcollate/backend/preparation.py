"""`packcollate.prepare(model)`: an explicit, scoped change to one model, never an import side effect.

`import packcollate` registers the attention backend and its mask function with transformers and
changes nothing else. Most models need nothing more: their attention goes through the backend, which
keeps packed examples apart from the `cu_seq_lens_*` / `position_ids` / mask reaching every call.
Layers that carry state along the sequence (Mamba mixers, short convolutions, gated delta nets, …)
or compute attention inside the model (BLOOM, MPT, GPT-Neo, …) do not call the backend, and layers
that read the 4-D mask themselves (sparse-attention indexers, block biases, dynamic masks:
DeepSeek-V3.2, DeepSeek-V4, Doge, …) need one example's mask; for them `prepare(model)`
(idempotent; returns the model) changes that one model. For every model it also hands the mask
function the layout of the call: with a cache transformers looks for no packed sequences in
`position_ids`, and the attention layers of some families get neither `cu_seq_lens_*` nor
`position_ids` (GPTBigCode, Persimmon, CTRL), so without it a batch whose only carrier is
`position_ids` (transformers' `DataCollatorWithFlattening` default) would mix examples there:

- each such layer gets the forward of `restart.restart_layer`: its packed examples run apart (so do
  attention layers that number their tokens themselves, Inkling's log-scaled queries, and positional
  embeddings that number the packed row's tokens, BART-style decoders');
- every transformers model inside it (the causal LM, its decoder, a VLM's text model) gets a
  forward pre-hook and a forward hook that push and pop the call's `PackedForward` (its `(B, S)`
  tokens and their layout, `layout.layout_of_inputs`): the layout travels with the call
  (`backend.state`), per thread, never in a process global, and the mask function marks its
  sequence starts (`mask._layout_starts`);
- the checkpointed units holding them (transformers' `GradientCheckpointingLayer`) get their checkpoint
  function wrapped at each forward: what it checkpoints runs, then and again when backward recomputes
  it, inside the `PackedForward` of that forward, however many forwards ran in between;
- a model that pools its tokens into patches (BLT) gets `patches.prepare_patching_models`: each packed
  example its own n-gram hashes and patches, its global transformer in patch units, its decoder's patch shift
  inside the example;
- a vision-language model's vision tower gets `collate.vision.shield_vision_tower` (the text's
  packing kwargs never reach it);
- `generate`'s own mask building (compileable caches) runs inside the model's forward state.

`PackedTrainer` and the TRL trainers prepare the model they get (`check_model` and the guards prepare
their own tiny copies; `assert_packing_safe` refuses a user's model that needs preparing and was not).
In a hand-written loop:

    model = packcollate.prepare(AutoModelForCausalLM.from_pretrained(path, attn_implementation="packcollate"))

A model that needs preparing but was not raises `NotPreparedError` at its first forward on the
backend, from the mask function every such model with attention calls (`require_prepared`).
Pure state-space models (Mamba, Mamba-2, FalconMamba, RWKV, xLSTM) have no attention and call no
mask function: no packcollate code runs in their forward unless they are prepared, so nothing can
refuse there. Prepare them (the trainers do).
"""

from __future__ import annotations

import functools
import inspect
import re
import types

import torch

from ..collate.vision import shield_vision_tower
from ..errors import BackendRefused, NotPreparedError, UnsupportedError
from ..layout import BACKEND_NAME, SequenceLayout, from_sequence_map, layout_of_inputs
from ..unwrap import unwrap_model
from . import patches, restart, state
from .state import PackedForward


def prepare(model: torch.nn.Module, attn_implementation: str | None = None) -> torch.nn.Module:
    """Make `model`'s state-carrying layers and attention written inside the model keep packed examples
    apart on the packcollate backend (see the module docstring); idempotent, returns `model`.

    Works on the bare model or any wrapper holding it as a submodule (PEFT, torch.compile, DDP,
    FSDP, accelerate). A model without such layers only hands its calls' layout to the mask function;
    nothing changes while a prepared model runs on another backend. `attn_implementation`: switch the model to that backend first
    (`set_attn_implementation`), e.g. `"packcollate"` for families that pick an attention class by
    backend name when built and know only their own (GPT-Neo, and Falcon up to transformers 5.24:
    build them with their default attention, then `prepare(model, attn_implementation="packcollate")`).
    """
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.masking_utils import create_masks_for_generate

    if attn_implementation is not None:
        use_backend(unwrap_model(model), attn_implementation)
    mixers = restart.token_mixers(model)
    attention = restart.per_bucket_attention_layers(model)
    kind = "mask-reading" if restart.mask_reading_layers(model) else "attention"
    restarted = ([(name, layer, "positions") for name, layer in restart.row_position_embeddings(model)]
                 + [(name, layer, "mixer") for name, layer in mixers] + [(name, layer, kind) for name, layer in attention])
    for _, layer, kind in restarted:
        restart.restart_layer(layer, kind)
    # every model: the layout of its call reaches the mask function too, which with a cache (transformers then
    # looks for no packed sequences) is the only carrier layers that get neither cu_seq_lens nor position_ids see
    per_bucket = restart.attention_per_bucket(model)  # the model's masks are its own layers', not a tower's only
    # every checkpointed unit: layers read the call's layout when recomputed too (chunked attention)
    units = [unit for unit in model.modules() if hasattr(unit, "gradient_checkpointing")]
    # layers that cannot run without the layout (under torch.compile too); the others only gain the cache's map,
    # which a traced mask does without (no graph break: `_traced`)
    needed = bool(restarted) or any(patches.is_patching_model(module) for module in model.modules()) or any(
        restart.stateful_classes(type(module.config)) for module in model.modules()
        if isinstance(getattr(module, "config", None), PretrainedConfig))
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not module.__dict__.get("_packcollate_forward_hooks"):
            module.register_forward_pre_hook(functools.partial(_before_model, per_bucket, units, needed),
                                             with_kwargs=True)
            module.register_forward_hook(functools.partial(_after_model, needed), with_kwargs=True, always_call=True)
            module.__dict__["_packcollate_forward_hooks"] = True
            # it can generate, and its mask function checks that it is prepared
            if needed and callable(getattr(module, "prepare_inputs_for_generation", None)):
                own = getattr(module, "create_masks_for_generate", None)  # a model's own, else transformers'
                module.__dict__["_packcollate_create_masks"] = (own or create_masks_for_generate, per_bucket)
                module.create_masks_for_generate = types.MethodType(_create_masks_inside, module)
    patches.prepare_patching_models(model)  # after the hooks above: its model's hook reads the forward they enter
    shield_vision_tower(model)
    return model


def use_backend(model: torch.nn.Module, attn_implementation: str) -> None:
    """Switch `model` to the attention backend `attn_implementation` (`set_attn_implementation`).

    A model whose attention is all computed inside it (GPT-Neo; Falcon up to transformers 5.24) refuses
    the switch, although the packcollate backend's name decides nothing there but the mask
    transformers builds for it: its configs are switched directly to the packcollate backend (`prepare`
    restarts its attention layers) and back to the backend its layers were built with, never to another
    (their layers would read that backend's mask in their own convention). Raises `BackendRefused` when
    a model keeps its backend otherwise."""
    model.set_attn_implementation(attn_implementation)
    kept = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if kept == attn_implementation:
        return
    built_with = model.__dict__.get("_packcollate_built_with", kept)
    if BACKEND_NAME in (attn_implementation, kept) and attn_implementation in (BACKEND_NAME, built_with) \
            and restart.attention_all_internal(model):
        model.__dict__["_packcollate_built_with"] = built_with
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = attn_implementation
        return
    model.set_attn_implementation(kept)
    raise BackendRefused(
        f"{type(model).__name__} kept attn_implementation={kept!r} when asked for {attn_implementation!r}: it does "
        f"not switch attention backends after loading; pass attn_implementation={attn_implementation!r} when building it"
    )


# ---------------------------------------------------------------------------------------------
# The packed forward of a model call
# ---------------------------------------------------------------------------------------------


def _tokens_shape(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None and args and isinstance(args[0], torch.Tensor):
        tokens = args[0]
    return tuple(tokens.shape[:2]) if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None


def _padded(kwargs: dict) -> bool:
    """A padded batch (a 2-D `attention_mask` with zeros) without `cu_seq_lens_q`: its rows are its
    sequences (left-padded generation computes restarting `position_ids` too); transformers' own
    padding masks handle it."""
    mask = kwargs.get("attention_mask")
    return (kwargs.get("cu_seq_lens_q") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2
            and not bool(mask.all()))


# a causal LM whose loss reads labels[t] as the target of logits[t] (no shift: BART-style decoders, Whisper's)
_UNSHIFTED_LOSS = re.compile(r"\(\s*logits\.(view|reshape)\(-1[^)]*\)\s*,\s*labels\.(view|reshape)\(-1\)")


@functools.cache
def loss_without_shift(model_class: type) -> bool:
    """Whether `model_class.forward` computes its loss on unshifted labels (`labels[t]` the target of
    `logits[t]`), read from its source."""
    try:
        return bool(_UNSHIFTED_LOSS.search(inspect.getsource(model_class.forward)))
    except (OSError, TypeError):
        return False


def _refuse_unshifted_labels(model, kwargs: dict) -> None:
    """A packed batch's labels follow the shifted convention (`labels[t] = input_ids[t]`, the model shifts): a
    language model (it can generate) that does not shift would learn to copy its input. Per-token heads (token
    classification) read their labels unshifted by design."""
    if (isinstance(kwargs.get("labels"), torch.Tensor) and callable(getattr(model, "prepare_inputs_for_generation", None))
            and loss_without_shift(type(model))):
        raise UnsupportedError(
            f"{type(model).__name__} computes its loss without shifting the labels (labels[t] is the target of "
            f"logits[t]), while packcollate's labels are the tokens themselves (the model shifts them): it would learn "
            f"to copy its input; pass no labels and compute the shifted token loss from the logits yourself"
        )


def _packed_padded_rows(model, needed: bool, shape: tuple[int, int], kwargs: dict) -> SequenceLayout | None:
    """The layout of a padded batch (`_padded`) whose rows hold several examples, as its `position_ids` restart
    among the real tokens (a pad segment marked in `attention_mask`, TRL's padded packing), or None when each row
    holds one (left-padded generation numbers its real tokens on). transformers' mask looks for packed sequences
    only without an `attention_mask`: the mask function marks these (`mask._layout_starts`). Layers that run their
    examples apart (`needed`) do so on unpadded rows only: refused in one line."""
    position_ids = kwargs.get("position_ids")
    if not (isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == shape[1]):
        return None
    layout = from_sequence_map(kwargs["attention_mask"], *shape, None, position_ids.expand(shape[0], -1))
    if len(layout.lengths()) <= shape[0]:
        return None
    if needed:
        raise UnsupportedError(
            f"{type(model).__name__}: a padded batch whose rows hold several packed examples (position_ids restart "
            f"inside its attention_mask's real tokens); this model's layers that carry state or pool tokens run their "
            f"examples apart only on unpadded packed rows: use PackedCollator (no padding), or one example per row"
        )
    return layout


def _traced(needed: bool) -> bool:
    """A traced call (`torch.compile`) of a model whose layers do without the layout: its hooks do nothing."""
    return not needed and torch.compiler.is_compiling()


def _before_model(attention_per_bucket: bool, units: list, needed: bool, model, args, kwargs):
    """Model-level pre-hook: the outermost call sets the packed forward; an inner model (the decoder of
    a causal LM) refines it only when its call carries the layout. The checkpointed `units` holding
    restarted layers will recompute with it (`_InPackedForward`). `needed`: some layer of the model cannot
    run without it."""
    if _traced(needed):
        return
    _keep_layout_when_recomputed(units)
    outer = state.current()
    try:
        shape = _tokens_shape(args, kwargs)
        active = getattr(getattr(model, "config", None), "_attn_implementation", None) == BACKEND_NAME
        layout = None
        if shape is not None and shape[1] > 1 and active:  # a decoding step holds one token a row: nothing packed
            layout = _packed_padded_rows(model, needed, shape, kwargs) if _padded(kwargs) else layout_of_inputs(*shape, kwargs)
        if outer is None and layout is not None:
            _refuse_unshifted_labels(model, kwargs)
    except BaseException:
        state.push(outer)  # the forward hook runs however the call ends, and pops exactly one
        raise
    if outer is None or layout is not None:
        outer = PackedForward(active, shape, layout, attention_per_bucket)
    elif outer.layout is not None and shape != outer.shape:
        # a tower's own call (pixels, audio frames): not the packed row, its layers run as they are; inside
        # the packed model's own call, a restarted layer handed another sequence refuses (`restart.py`)
        outer = PackedForward(outer.active, shape, None, outer.attention_per_bucket)
    state.push(outer)


def _after_model(needed: bool, model, args, kwargs, output):
    if not _traced(needed):
        state.pop()


def _create_masks_inside(self, *args, **kwargs):
    """`generate` builds the masks of a compileable cache itself, outside the model's forward: inside the
    model's (unpacked) forward state instead, so the mask function knows the model is prepared. A bound
    method: a deep copy of the model calls its own."""
    create_masks, attention_per_bucket = self.__dict__["_packcollate_create_masks"]
    active = getattr(getattr(self, "config", None), "_attn_implementation", None) == BACKEND_NAME
    state.push(PackedForward(active, None, None, attention_per_bucket))
    try:
        return create_masks(*args, **kwargs)
    finally:
        state.pop()


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing: the recomputation sees its own forward's layout
# ---------------------------------------------------------------------------------------------


class _InPackedForward:
    """A checkpointed unit's checkpoint function (transformers' `_gradient_checkpointing_func`), wrapped:
    the function it checkpoints runs inside the `PackedForward` of the forward that called it, at that
    forward and again when backward recomputes it (the state travels with the call, not in a global)."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def __call__(self, function, *args, **kwargs):
        packed = state.current()

        def run(*inner_args, **inner_kwargs):
            state.push(packed)
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                state.pop()

        return self.checkpoint(run, *args, **kwargs)


def _keep_layout_when_recomputed(units: list[torch.nn.Module]) -> None:
    """Wrap each unit's checkpoint function (`gradient_checkpointing_enable` sets a new one: wrapped again at
    the next forward)."""
    for unit in units:
        checkpoint = unit.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None and not isinstance(checkpoint, _InPackedForward):
            unit._gradient_checkpointing_func = _InPackedForward(checkpoint)


# ---------------------------------------------------------------------------------------------
# Models that were never prepared
# ---------------------------------------------------------------------------------------------


def check_prepared(model: torch.nn.Module) -> None:
    """Raise `NotPreparedError` when `model` (bare or wrapped) has layers that carry state or compute
    attention inside the model and `prepare` did not restart them (read from the model itself: pure
    state-space models included, which no mask function ever sees)."""
    missing = sorted({type(layer).__name__ for _, layer in [*restart.token_mixers(model),
                                                             *restart.per_bucket_attention_layers(model)]
                      if not restart.is_restarted(layer)}
                     | {type(module).__name__ for module in model.modules()
                        if patches.is_patching_model(module) and not patches.is_prepared(module)})
    if missing:
        raise NotPreparedError(
            f"{type(unwrap_model(model)).__name__}: {', '.join(missing)} would carry one packed example's state into "
            f"the next (or compute attention across them) until the model is prepared; call "
            f"packcollate.prepare(model) before training (PackedTrainer and the TRL trainers do it)"
        )


def require_prepared(config) -> None:
    """Raise `NotPreparedError` when a model of `config` needs `prepare` (read from its modeling file:
    `restart.stateful_classes`); called by the mask function outside any prepared forward."""
    if config is None:
        return
    needs = restart.stateful_classes(type(config))
    if not needs:
        return
    if needs.mixers:
        what = f"{', '.join(needs.mixers)} carry state along the sequence"
    elif needs.row_counting:
        what = f"{', '.join(needs.row_counting)} number the packed row's tokens in their forward, not each example's"
    elif needs.positions:
        what = f"{', '.join(needs.positions)} number the packed row's tokens, not each example's"
    elif needs.patching:
        what = ("it pools its tokens into patches, which must follow each example: its n-gram hashes, entropy "
                "patches, global transformer and decoder's patch shift")
    elif needs.mask_readers:
        what = (f"{', '.join(needs.mask_readers)} read the 4-D attention mask themselves and must see one example's "
                f"mask, not the packed row's")
    else:
        what = "its attention is computed inside the model, not through the attention backend"
    raise NotPreparedError(
        f"{config.model_type}: attn_implementation={BACKEND_NAME!r} keeps packed examples apart in this model only once "
        f"it is prepared ({what}); call packcollate.prepare(model) before training or generating (PackedTrainer and "
        f"the TRL trainers do it)"
    )
