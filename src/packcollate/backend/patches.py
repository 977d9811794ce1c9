"""Models that pool their tokens into patches (BLT): each packed example gets its own patches, in patch units.

BLT (`BltModel`) embeds bytes with hashed n-grams, cuts them into patches where a small entropy model
is unsure (its `patcher`), pools each patch's bytes in a local encoder, runs a global transformer over
the patches, and decodes each byte from the patch its one-patch shift hands it. Over a packed row
`(1, N)` every step would cross examples: an n-gram hash reads the previous example's last bytes; entropy
patching forces patch starts only at the row's first two bytes, so a patch can hold bytes of two
examples; the global transformer numbers and attends the whole row's patches; and the decoder's shift
hands an example's last byte the next example's first patch.

`packcollate.prepare` gives each such model (`prepare_patching_models`) forward pre-hooks that make one
packed forward equal each example run alone. The patch layout of the forward (`PatchLayout`) travels with
the call, in the kwargs the model hands its parts (`PATCHES`), never in a global:

- the model: n-gram hash embeddings per example (each example's hashes see zeros before its first
  byte, as at a row start: `restarted_hash_embeddings`); the entropy model over the packed row with each
  example's positions; patch lengths per example exactly as the example alone gets them: starts at its
  first two bytes and wherever its entropy says, the empty patch that may follow its last byte, then
  `max_patch_length` (`patch_layout`);
- with a cache asked for and none given, a plain `EncoderDecoderCache` (transformers 5.24 and 5.25 build
  BLT's from a config they cannot read, and raise on every backend);
- the local encoder: each patch pools its own bytes (its masks come from those patch lengths). An empty
  patch (after an example's last byte) attends the whole row evenly, where alone it attends its example's
  bytes evenly; no byte reads it (each reads an earlier patch of its own example, and the global
  transformer attends per example, causally), so nothing of it reaches an output or a gradient;
- the global transformer: patches numbered from each example's first patch and attended per example
  (`cu_seq_lens_*` counted in patches);
- the local decoder: each byte reads the patch the example alone hands it;
- cross-attention layers: no byte layout reaches them (their masks hold everything);
- self-attention layers: the sliding window their mask carries under eager (`local_attention_window_len`,
  the entropy model's `sliding_window`), which they do not pass to the attention backend.

Shapes: a packed forward holds `E` examples, `N` bytes in one row, `P` patches, `k = cross_attn_k`
slots per patch.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass

import torch

from ..errors import UnsupportedError
from ..layout import BACKEND_NAME, PACKING_KEYS, SequenceLayout, example_index, example_positions
from . import state

#: Config attributes of models that pool their tokens into patches and run a transformer over the patches
#: (BLT's byte patches): `patching_mode` on the model's config, `cross_attn_k` on its local encoder's and decoder's.
PATCHING_CONFIG_KEYS = ("patching_mode", "cross_attn_k")
#: the kwarg by which a packed forward's `PatchLayout` travels from the model to its encoder, global
#: transformer and decoder (each takes it out of its own call)
PATCHES = "packcollate_patches"
# the parts of a patching model the hooks need
_PARTS = ("local_encoder", "global_transformer", "local_decoder", "encoder_hash_tok_embedding")


def pools_into_patches(config) -> bool:
    """Whether `config` (an instance or a config class) belongs to a model that pools tokens into patches."""
    return any(getattr(config, key, None) is not None for key in PATCHING_CONFIG_KEYS)


def is_patching_model(module: torch.nn.Module) -> bool:
    """A model that pools tokens into patches and has the parts the hooks rewire (BLT's `BltModel`)."""
    return pools_into_patches(getattr(module, "config", None)) and all(hasattr(module, part) for part in _PARTS)


def is_prepared(module: torch.nn.Module) -> bool:
    """Whether `module` lies in a patching model `prepare_patching_models` prepared."""
    return bool(module.__dict__.get("_packcollate_patches"))


@dataclass(frozen=True)
class PatchLayout:
    """The patches of one packed forward, each example's as it alone gets them.

    Attributes:
        lengths: `(1, P)` int64 patch lengths in bytes, example after example (an empty patch is 0).
        cu_patches: `(E+1,)` int32, the first patch of each example, then `P`.
        positions: `(1, P)` int64, each patch's index in its example.
        max_patches: the most patches of one example.
        decoder_patch: `(N,)` int64, the patch each byte's decoder cross-attention reads.
        cross_attn_k: `k`, slots per patch in the cross-attention layers.
    """

    lengths: torch.Tensor
    cu_patches: torch.Tensor
    positions: torch.Tensor
    max_patches: int
    decoder_patch: torch.Tensor
    cross_attn_k: int

    def decoder_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """`(1, 1, N, P*k)` additive mask of the decoder's cross-attention (bytes over patch slots): 0 on the
        slots of the patch each byte reads (`decoder_patch`), `finfo.min` elsewhere."""
        slot_patch = torch.arange(self.lengths.shape[1] * self.cross_attn_k, device=self.lengths.device) // self.cross_attn_k
        allowed = self.decoder_patch[:, None] == slot_patch[None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _modeling_function(model: torch.nn.Module, name: str):
    """A function of the model's own modeling file (`compute_hash_embeddings`, `process_patch_lengths`)."""
    function = getattr(sys.modules.get(type(model).__module__), name, None)
    if not callable(function):
        raise UnsupportedError(
            f"{type(model).__name__}: its modeling file has no {name}, which packcollate calls to give each packed "
            f"example its own patches; train this architecture with padding (PaddedCollator)"
        )
    return function


def restarted_hash_embeddings(model: torch.nn.Module, input_ids: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """`(1, N, D)` byte embeddings with n-gram hashes that restart at every example: the model's own
    `compute_hash_embeddings` over the row with `g` zeros before each example (`g + 1` the longest n-gram),
    read back at the bytes, so each example's first n-grams see zeros, as at a row start."""
    config = model.config
    gap = max(config.encoder_hash_byte_group_size or [1]) - 1
    length = input_ids.shape[1]
    at = torch.arange(length, device=input_ids.device) + gap * (example_index(layout.cu_seq_lens, length) + 1)
    spaced = input_ids.new_zeros(1, length + gap * (layout.cu_seq_lens.numel() - 1))
    spaced[0, at] = input_ids[0]
    embeddings = _modeling_function(model, "compute_hash_embeddings")(
        spaced, model.local_encoder, model.encoder_hash_tok_embedding, config.encoder_hash_byte_group_nb_functions,
        config.encoder_hash_byte_group_size, config.encoder_hash_byte_group_vocab,
    )
    return embeddings[:, at]


def patch_layout(model: torch.nn.Module, input_ids: torch.Tensor, layout: SequenceLayout) -> PatchLayout:
    """Each example's patches as the model alone would cut them, laid out along the packed row.

    Alone, an example of `n` bytes starts patches at bytes 0 and 1 and at every byte `p` in `2 … n` whose
    previous byte's entropy is over `patching_threshold` (`p = n` starts an empty patch after its last byte);
    without entropy patching every byte and one empty patch after them are patches. Then `max_patch_length`
    splits long patches (and drops empty ones). Each example gets `n + 1` candidate starts, flagged at once
    for all examples."""
    config = model.config
    cu = layout.cu_seq_lens.long()
    lengths = cu[1:] - cu[:-1]
    n_bytes, n_examples, device = input_ids.shape[1], lengths.numel(), input_ids.device
    byte_example = example_index(cu, n_bytes)
    # candidate starts: example e's n_e + 1 slots, local positions 0 … n_e
    slots = torch.cat([cu.new_zeros(1), torch.cumsum(lengths + 1, 0)])
    slot_example, slot_local = example_index(slots, n_bytes + n_examples), example_positions(slots, n_bytes + n_examples)
    starts = slot_local <= 1
    if config.patching_mode == "entropy" and getattr(model, "patcher", None) is not None:
        with torch.no_grad():  # its own patch lengths: unused
            entropies = model.patcher(input_ids, position_ids=example_positions(cu, n_bytes)[None])[0][0]
        before = (cu[:-1][slot_example] + slot_local - 1).clamp(0, n_bytes - 1)
        starts |= (slot_local >= 2) & (entropies[before] > config.patching_threshold)
    else:
        starts = torch.ones_like(starts)
    slots = starts.nonzero().squeeze(1)
    example, local_start = slot_example[slots], slot_local[slots]
    same_example = torch.cat([example[1:] == example[:-1], example.new_zeros(1, dtype=torch.bool)])
    ends = torch.where(same_example, torch.roll(local_start, -1), lengths[example])
    raw = ends - local_start
    patch_lengths = _modeling_function(model, "process_patch_lengths")(raw[None], config.max_patch_length)
    if config.max_patch_length is not None:  # each patch becomes its pieces (an empty one none)
        example = torch.repeat_interleave(example, (raw + config.max_patch_length - 1) // config.max_patch_length)
    counts = torch.bincount(example, minlength=n_examples)
    cu_patches = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    n_patches = patch_lengths.shape[1]
    starts_in_row = torch.cumsum(patch_lengths[0], 0) - patch_lengths[0]
    byte = torch.arange(n_bytes, device=device)
    # alone, byte t reads patch #{k >= 1: start_k <= t + length_0} - 1 (at least 0); in the row, counted
    # over its own example's patches
    first = patch_lengths[0][cu_patches[:-1].clamp(max=n_patches - 1)][byte_example]
    reached = torch.minimum(torch.searchsorted(starts_in_row, byte + first, right=True), cu_patches[1:][byte_example])
    decoder_patch = torch.maximum(reached - 2, cu_patches[:-1][byte_example])
    return PatchLayout(
        lengths=patch_lengths, cu_patches=cu_patches.to(torch.int32),
        positions=example_positions(cu_patches, n_patches)[None],
        max_patches=int(counts.max()), decoder_patch=decoder_patch, cross_attn_k=int(config.cross_attn_k),
    )


# ---------------------------------------------------------------------------------------------
# The hooks
# ---------------------------------------------------------------------------------------------


def _refuse(model: torch.nn.Module, why: str) -> None:
    raise UnsupportedError(
        f"{type(model).__name__} pools its tokens into patches and packcollate gives each packed example its own "
        f"patches only {why}; train it with padding (PaddedCollator)"
    )


def _before_patching_model(model, args, kwargs):
    """The model's pre-hook (after `preparation`'s, which entered the packed forward): on a packed row, the
    restarted hash embeddings, each example's patches and the `PatchLayout` for its parts."""
    packed = state.current()
    if packed is None or not packed.active or packed.layout is None:
        return None
    if args:
        kwargs = {**dict(zip(list(inspect.signature(type(model).forward).parameters)[1:], args)), **kwargs}
    input_ids, layout = kwargs.get("input_ids"), packed.layout
    if not isinstance(input_ids, torch.Tensor):
        _refuse(model, "from input_ids (its n-gram hashes and entropy patches read the bytes), got inputs_embeds")
    if kwargs.get("patch_lengths") is not None:
        _refuse(model, "when it cuts them itself, got patch_lengths for the whole packed row")
    if input_ids.shape[0] != 1:
        _refuse(model, f"over one packed row, got input_ids of shape {tuple(input_ids.shape)}")
    patches = patch_layout(model, input_ids, layout)
    embeddings = restarted_hash_embeddings(model, input_ids, layout)
    use_cache = kwargs.get("use_cache")
    if (model.config.use_cache if use_cache is None else use_cache) and kwargs.get("cache") is None:
        # transformers (5.24, 5.25) builds BLT's cache from a config it cannot read (`DynamicCache(config=BltConfig)`
        # raises on every backend): a plain cache of the packed forward, which fills it as the model would
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        kwargs["cache"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
    # the bytes' layout travels to the local encoder's and decoder's attention in the kwargs, whatever the
    # collator emitted: their layers get no position_ids, and with a cache transformers' mask does not look for
    # packed sequences
    lengths = {"cu_seq_lens_q": layout.cu_seq_lens, "cu_seq_lens_k": layout.cu_seq_lens,
               "max_length_q": layout.max_length, "max_length_k": layout.max_length}
    return (), {**kwargs, **lengths, "input_ids": None, "inputs_embeds": embeddings, "patch_lengths": patches.lengths,
                PATCHES: patches}


def _without_patches(module, args, kwargs):
    """The local encoder pools each patch's own bytes already (its masks come from the patch lengths)."""
    kwargs.pop(PATCHES, None)
    return args, kwargs


def _before_global_transformer(module, args, kwargs):
    """Patch units: positions from each example's first patch, `cu_seq_lens_*` over patches."""
    patches = kwargs.pop(PATCHES, None)
    if patches is None:
        return args, kwargs
    kwargs = {key: value for key, value in kwargs.items() if key not in PACKING_KEYS}
    return args, {**kwargs, "attention_mask": None, "position_ids": patches.positions,
                  "cu_seq_lens_q": patches.cu_patches, "cu_seq_lens_k": patches.cu_patches,
                  "max_length_q": patches.max_patches, "max_length_k": patches.max_patches}


def _before_local_decoder(module, args, kwargs):
    patches = kwargs.pop(PATCHES, None)
    if patches is not None:
        kwargs["encoder_attention_mask"] = patches.decoder_mask(kwargs["encoder_attention_mask"].dtype)
    return args, kwargs


def _without_layout(module, args, kwargs):
    """Cross-attention (patches over bytes, bytes over patches): its mask holds everything; the byte layout
    and a self-attention window would describe other tokens."""
    return args, {key: value for key, value in kwargs.items() if key not in (*PACKING_KEYS, "sliding_window")}


def _with_window(window: int, module, args, kwargs):
    """Self-attention whose sliding window only its mask carries: hand it to the packcollate backend too."""
    if getattr(module.config, "_attn_implementation", None) == BACKEND_NAME and kwargs.get("sliding_window") is None:
        kwargs = {**kwargs, "sliding_window": window}
    return args, kwargs


def _self_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "q_proj") and getattr(module, "is_causal", False) is True


def _cross_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "q_proj") and getattr(module, "is_causal", True) is False


def prepare_patching_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Give every patching model inside `model` the hooks of the module docstring (idempotent); returns them.
    Call after the models' `preparation` pre-hooks are registered: the model's own hook reads the packed
    forward they enter; its parts' hooks run before theirs, which then read the patch units."""
    found = [module for module in model.modules() if is_patching_model(module)]
    for patching in found:
        if is_prepared(patching):
            continue
        config = patching.config
        local_window = config.encoder_config.sliding_window if config.local_attention_window_len is not None else None
        patcher = getattr(patching, "patcher", None)
        windows = [(patching.local_encoder, local_window), (patching.local_decoder, local_window)]
        if patcher is not None:
            windows.append((patcher, patcher.config.sliding_window))
        for part, window in windows:
            for module in part.modules():
                if _self_attention(module) and window is not None:
                    module.register_forward_pre_hook(functools.partial(_with_window, window), with_kwargs=True)
        for module in patching.modules():
            if _cross_attention(module):
                module.register_forward_pre_hook(_without_layout, with_kwargs=True)
        patching.register_forward_pre_hook(_before_patching_model, with_kwargs=True)
        patching.local_encoder.register_forward_pre_hook(_without_patches, with_kwargs=True, prepend=True)
        patching.global_transformer.register_forward_pre_hook(_before_global_transformer, with_kwargs=True, prepend=True)
        patching.local_decoder.register_forward_pre_hook(_before_local_decoder, with_kwargs=True, prepend=True)
        for module in patching.modules():
            module.__dict__["_packcollate_patches"] = True
    return found
