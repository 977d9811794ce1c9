"""Recurrent, convolutional and linear-attention layers restart at every packed example.

SSM mixers (Mamba, Mamba-2), short convolutions (LFM2), gated delta nets (Qwen3.5, Qwen3-Next),
lightning attention (MiniMax), RG-LRU blocks (RecurrentGemma), RWKV and xLSTM layers carry state
from token to token: run over a packed row `(1, N, D)` they carry it from one example into the next.
With `attn_implementation="packcollate"` every such layer ("token mixer") sees its examples apart:

- with the fast kernels (CUDA, and every kernel function the layer calls over whole sequences is
  the installed `mamba_ssm` / `causal_conv1d` / `fla` one and takes `seq_idx` or `cu_seqlens`: read
  from transformers' kernel wrappers at run time), the layer runs packed, with the `seq_idx` /
  `cu_seq_lens_q` its kernels read (filled in from the layout when the collator did not emit them);
- otherwise its examples are gathered into right-padded batches `(G, L, D)` of similar-length
  examples (length buckets, as the exact attention path's: causal layers are exact under right
  padding), the layer's own PyTorch forward runs on each batch with no cache and no `seq_idx`, and
  the outputs are put back in token order `(1, N, D)`. One call per bucket, never per example.

Attention layers written inside the model (no `AttentionInterface`: BLOOM, MPT, XGLM, GPT-Neo, …)
run their examples apart the same way, with the plain causal mask the packcollate mask function
hands such models, cut to each bucket (and BLOOM's ALiBi biases).

The packed layout is the attention backend's (`cu_seq_lens_q`, else `position_ids`, else `seq_idx`),
read once per forward by a hook on the model, and kept after it for gradient checkpointing's
recomputation. Token mixers are found at run time by class name, or because they own a depthwise
convolution over the tokens; internal attention layers by their source. `restart_token_mixers(model)`
installs the hooks; `register()` makes every transformers model built after `import packcollate`
install them itself. The cache of a packed forward is not filled (a packed row has no single state
to continue from); padded batches (a 2-D `attention_mask` with zeros) run as transformers runs them.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import types
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from . import attention

# class names of layers that carry state along the sequence (Mamba mixers, short convolutions, gated
# delta nets, lightning/linear attention, RG-LRU, RWKV time and channel mixing, xLSTM)
TOKEN_MIXER_CLASS = re.compile(
    r"Mixer$|MambaLayer$|ShortConv|DeltaNet$|DeltaAttention$|LightningAttention$|Rglru$|RecurrentBlock$|"
    r"^Rwkv(SelfAttention|FeedForward)$|^xLSTMLayer$|ShortConvolution$|CCAProjection$"
)

# keyword arguments of the packed layout: dropped when the layer runs on padded batches
_LAYOUT_KWARGS = frozenset({"seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "cu_seqlens"})
# arguments that carry a cache, a recurrent state or a padding mask of the packed row: None on padded
# batches (the batches hold no padding a layer must skip: right padding comes after every real token)
_ROW_STATE_ARGS = frozenset({
    "cache", "cache_params", "past_key_values", "past_key_value", "layer_past", "state", "cache_position",
    "attention_mask", "conv_mask", "mask",
})


def is_token_mixer(module: torch.nn.Module) -> bool:
    """A layer that carries state along the sequence: by its class name, or because it owns a
    depthwise convolution over the tokens (Mamba's conv1d, short convolutions)."""
    if TOKEN_MIXER_CLASS.search(type(module).__name__):
        return True
    return any(
        isinstance(child, torch.nn.Conv1d) and 1 < child.groups == child.in_channels and child.kernel_size[0] > 1
        for child in module.children()
    )


def token_mixers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost token mixers of `model` (a mixer inside a mixer runs inside its parent's split)."""
    return _outermost(model, is_token_mixer)


# class names of attention layers
_ATTENTION_CLASS = re.compile(r"(Attention|Attn)$")
# what a layer's source names when its attention goes through transformers' AttentionInterface
_INTERFACE_NAMES = ("ALL_ATTENTION_FUNCTIONS", "AttentionInterface", "attention_interface", "packcollate_attention")


@functools.lru_cache(maxsize=None)
def _names_interface(cls: type) -> bool | None:
    """Whether the class's source, or its forward's (inherited from a parent), names the
    AttentionInterface; None when the source cannot be read."""
    owner = next((klass for klass in cls.__mro__ if "forward" in vars(klass)), cls)
    try:
        source = inspect.getsource(cls) + inspect.getsource(owner)
    except (OSError, TypeError):
        return None
    return any(name in source for name in _INTERFACE_NAMES)


def _writes_attention_inside(module: torch.nn.Module) -> bool:
    """A transformers attention layer that neither itself nor through any layer inside it goes
    through the AttentionInterface (BERT's `BertAttention` wraps a `BertSelfAttention` that does)."""
    cls = type(module)
    if not (_ATTENTION_CLASS.search(cls.__name__) and cls.__module__.startswith("transformers.")):
        return False
    return _names_interface(cls) is False and not any(_names_interface(type(m)) for m in module.modules())


def internal_attention_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost attention layers of `model` that compute attention themselves, not through
    transformers' `AttentionInterface` (BLOOM, MPT, XGLM, GPT-2-era models): read from their source
    at run time. Like token mixers, they run their examples apart under the packcollate backend."""
    return _outermost(model, lambda module: _writes_attention_inside(module) and not is_token_mixer(module))


def _outermost(model: torch.nn.Module, predicate) -> list[tuple[str, torch.nn.Module]]:
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if module is model or any(name.startswith(parent + ".") for parent, _ in found):
            continue
        if predicate(module):
            found.append((name, module))
    return found


# ---------------------------------------------------------------------------------------------
# The layout of the current forward
# ---------------------------------------------------------------------------------------------


@dataclass
class _Packing:
    """What the model-level hook saw: whether the packcollate backend is selected, the `(B, S)` of
    the tokens and their layout (None: one sequence per row)."""

    active: bool = False
    shape: tuple[int, int] | None = None
    layout: attention.SequenceLayout | None = None
    depth: int = 0
    internal_attention: bool = False


# one global, not thread-local: autograd may recompute checkpointed layers on another thread
_PACKING = _Packing()


def layout_from_inputs(batch: int, seq: int, kwargs: dict) -> attention.SequenceLayout | None:
    """The packed layout of a model call on `(B, S)` tokens from its keyword arguments:
    `cu_seq_lens_q` `(k+1,)`, else `position_ids` `(B|1, S)`, else `seq_idx` `(B, S)`; None when
    none is given, or each row is one sequence."""
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    seq_idx = kwargs.get("seq_idx")
    if isinstance(cu, torch.Tensor):
        layout = attention._layout_from_cu(cu, kwargs.get("max_length_q"), batch, seq)
    elif isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == seq:
        layout = attention._layout_from_positions(position_ids, batch, seq)
    elif isinstance(seq_idx, torch.Tensor) and tuple(seq_idx.shape) == (batch, seq):
        starts = torch.ones(batch, seq, dtype=torch.bool, device=seq_idx.device)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        layout = attention._layout_from_starts(starts, None)
    else:
        return None
    return None if layout.full_rows else layout


def _tokens_shape(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None and args and isinstance(args[0], torch.Tensor):
        tokens = args[0]
    return tuple(tokens.shape[:2]) if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None


def _before_model(model, args, kwargs):
    """Model-level pre-hook: the outermost call sets the layout; an inner model (the decoder of a
    causal LM) refines it only when its call carries the layout."""
    _PACKING.depth += 1
    outermost = _PACKING.depth == 1
    shape = _tokens_shape(args, kwargs)
    active = getattr(getattr(model, "config", None), "_attn_implementation", None) == attention.BACKEND_NAME
    layout = layout_from_inputs(*shape, kwargs) if shape is not None and active and not _padded(kwargs) else None
    if outermost or layout is not None:
        _PACKING.active, _PACKING.shape, _PACKING.layout = active, shape, layout
        _PACKING.internal_attention = bool(model.__dict__.get("_packcollate_internal_attention"))


def _internal_attention_mask_width() -> int | None:
    """For `attention.packcollate_mask`, while a model with internal attention layers runs (they add a
    mask themselves and know no sequence map): the longest example of a packed forward (a plain
    causal mask that wide, cut per bucket), 0 for any other forward (the mask eager would build), or
    None for other models."""
    packing = _PACKING
    if not (packing.internal_attention and packing.depth > 0):
        return None
    return packing.layout.max_length if packing.active and packing.layout is not None else 0


def _padded(kwargs: dict) -> bool:
    """A padded batch (a 2-D `attention_mask` with zeros) without `cu_seq_lens_q`: its rows are its
    sequences (left-padded generation computes restarting `position_ids` too); transformers' own
    padding masks handle it."""
    mask = kwargs.get("attention_mask")
    return (kwargs.get("cu_seq_lens_q") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2
            and not bool(mask.all()))


def _after_model(model, args, kwargs, output):
    _PACKING.depth -= 1


# ---------------------------------------------------------------------------------------------
# Running a token mixer on its examples
# ---------------------------------------------------------------------------------------------


# devices whose kernels may keep packed examples apart (the kernel packages are CUDA builds)
KERNEL_DEVICES = ("cuda",)
# the parameters by which a kernel keeps packed examples apart
_PACKING_PARAMETERS = ("seq_idx", "cu_seqlens")


@dataclass(frozen=True)
class KernelFunction:
    """A kernel function of a modeling file (transformers' `use_kernel_func_from_hub_with_fallback`):
    its name, whether the kernel package is installed (else the PyTorch fallback runs), and the
    parameters the function it calls takes."""

    name: str
    installed: bool
    parameters: tuple[str, ...]

    @property
    def keeps_examples_apart(self) -> bool:
        return self.installed and any(p in self.parameters for p in _PACKING_PARAMETERS)


def _unwrapped(value):
    """`value`, or the function that a `kernels` (>= 0.19) function module wraps (its forward calls it)."""
    if isinstance(value, torch.nn.Module):
        forward = getattr(type(value), "forward", None)
        return inspect.getclosurevars(forward).nonlocals.get("func") if inspect.isfunction(forward) else None
    return value


def kernel_wrapper(value):
    """The function transformers wrapped with a kernel fallback (`use_kernel_func_from_hub_with_fallback`),
    also inside a `kernels` function module, or None."""
    value = _unwrapped(value)
    if not inspect.isfunction(value):
        return None
    closure = inspect.getclosurevars(value).nonlocals
    return value if "is_new_implementation" in closure and "applicable_params" in closure else None


@functools.lru_cache(maxsize=None)
def kernel_functions(cls: type) -> tuple[KernelFunction, ...]:
    """The kernel functions `cls`'s forward calls: functions of its modeling file that transformers
    wrapped with a kernel fallback, named in the class's source or in the source of the file's own
    helpers it calls (transformers 5.25 moved Mamba-2's `causal_conv1d_fn` call into
    `causal_conv1d_forward`), also where the `kernels` package wraps them in function modules; read
    from the wrappers at run time."""
    try:
        sources = [inspect.getsource(cls)]
        namespace = vars(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return ()
    found, seen = {}, set()
    while sources:
        source = sources.pop()
        for name, value in namespace.items():
            value = _unwrapped(value)
            if name in seen or not (inspect.isfunction(value) and re.search(rf"\b{re.escape(name)}\(", source)):
                continue
            seen.add(name)
            if kernel_wrapper(value) is not None:
                closure = inspect.getclosurevars(value).nonlocals
                found[name] = KernelFunction(name, bool(closure["is_new_implementation"]),
                                             tuple(closure["applicable_params"]))
            elif getattr(value, "__module__", None) == cls.__module__:  # a helper of the same file: read it too
                try:
                    sources.append(inspect.getsource(value))
                except (OSError, TypeError):
                    pass
    return tuple(found.values())


def uses_kernels(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether `module` runs packed on `device` with its own kernels: a kernel device, and every
    kernel function its forward calls over whole sequences (not the one-step `*_update` of decoding)
    is the installed kernel and takes `seq_idx` or `cu_seqlens` (Mamba-1's selective scan takes
    neither: it always runs its examples apart)."""
    if device.type not in KERNEL_DEVICES:
        return False
    over_sequences = [f for f in kernel_functions(type(module)) if not f.name.endswith("update")]
    return bool(over_sequences) and all(f.keeps_examples_apart for f in over_sequences)


def _accepts(forward, name: str) -> bool:
    parameters = inspect.signature(forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _layout_kwargs(forward, layout: attention.SequenceLayout, shape, kwargs: dict) -> dict:
    """`kwargs` with `seq_idx` `(B, S)` int32 and `cu_seq_lens_q/_k` `(k+1,)` from `layout` where the
    caller passed none and `forward` takes them (transformers hands each kernel the ones it takes)."""
    kwargs = dict(kwargs)
    if kwargs.get("seq_idx") is None and _accepts(forward, "seq_idx"):
        lengths = torch.diff(layout.cu_seq_lens.long())
        ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        kwargs["seq_idx"] = ids.to(torch.int32).view(*shape)
    if kwargs.get("cu_seq_lens_q") is None and _accepts(forward, "cu_seq_lens_q"):
        kwargs.update(cu_seq_lens_q=layout.cu_seq_lens, cu_seq_lens_k=layout.cu_seq_lens,
                      max_length_q=layout.max_length, max_length_k=layout.max_length)
    return kwargs


def _bound_arguments(forward, args: tuple, kwargs: dict) -> dict:
    """Every argument by name (`**kwargs` flattened in)."""
    signature = inspect.signature(forward)
    bound = signature.bind(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{forward}: layers taking *args cannot run their examples apart")
        else:
            named[name] = value
    return named


def _split_value(value, shape: tuple[int, int], take):
    """A per-token tensor `(B, S, ...)` (or a tuple of them) gathered by `take`; anything else as is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == shape:
        return take(value.reshape(shape[0] * shape[1], *value.shape[2:]))
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_split_value(v, shape, take) for v in value)
    return value


_MASK_ARGS = frozenset({"attention_mask", "mask", "attn_mask", "causal_mask"})


def _is_square_mask(value, width: int) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[0] == 1
            and value.shape[-1] == value.shape[-2] >= width)


def _causal_mask_for_bucket(mask: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """A plain causal mask `(1, [H|1,] W, W)` (`W` >= the bucket's width), in whatever convention the
    model made it, cut to the bucket: `(G, [H|1,] L, L)`."""
    return mask[..., :width, :width].expand(count, *mask.shape[1:-2], width, width)


def _alibi_for_bucket(alibi: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """ALiBi biases `(B*H, 1, S)` of a packed row (BLOOM) for a bucket: `(G*H, 1, L)`. They grow
    linearly with the key position, so any offset gives each query row the same softmax."""
    return alibi[..., :width].repeat(count, 1, 1)


def _bucket_arguments(named: dict, shape, gather: torch.Tensor, count: int, width: int, attention_layer: bool) -> dict:
    def take(flat: torch.Tensor) -> torch.Tensor:
        return flat.index_select(0, gather).view(count, width, *flat.shape[1:])

    out = {}
    for name, value in named.items():
        if name in _LAYOUT_KWARGS:
            continue
        if attention_layer and name in _MASK_ARGS and _is_square_mask(value, width):
            out[name] = _causal_mask_for_bucket(value, count, width)
        elif attention_layer and name == "alibi" and isinstance(value, torch.Tensor) and value.dim() == 3:
            out[name] = _alibi_for_bucket(value, count, width)
        elif name in _ROW_STATE_ARGS:
            out[name] = None
        elif name == "use_cache":
            out[name] = False
        else:
            out[name] = _split_value(value, shape, take)
    return out


def _merge_outputs(outputs: list, counts: list[tuple[int, int]], back: torch.Tensor, shape):
    """The buckets' outputs back in token order: per-token tensors `(G, L, ...)` -> `(B, S, ...)`;
    a bucket's recurrent state has no place in the packed row and becomes None."""
    first = outputs[0]
    if isinstance(first, (tuple, list)):
        merged = [_merge_outputs([o[i] for o in outputs], counts, back, shape) for i in range(len(first))]
        return type(first)(merged) if type(first) in (tuple, list) else type(first)(*merged)
    if not isinstance(first, torch.Tensor):
        return first  # None or a flag
    if all(o.dim() >= 2 and tuple(o.shape[:2]) == c for o, c in zip(outputs, counts)):
        flat = torch.cat([o.reshape(-1, *o.shape[2:]) for o in outputs]).index_select(0, back)
        return flat.view(*shape, *flat.shape[1:])
    if all(o is first for o in outputs):
        return first  # the same tensor from every bucket (a layer's bias)
    return None  # a bucket's recurrent state or attention weights: no place in the packed row


# What one more bucket costs, in tokens of padding: each bucket is one more call of the layer (about
# ten kernels forward and backward), each padding token one more token of work. Measured on a tiny
# Mamba-2 train step (CPU, 16 FLAN-like examples): 32 and 256 equally fast, 1024 1.45x slower, one
# bucket for all 3.7x slower (its PyTorch scan grows faster than linearly with the padded length).
BUCKET_COST_TOKENS = 128


def plan_buckets(lengths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group examples of similar length; per bucket: `(G, L)` gather index and `(G,)` lengths.

    The examples, longest first, are cut into consecutive buckets that minimise the padded tokens
    (`G * L` summed over buckets) plus `BUCKET_COST_TOKENS` per bucket: a recurrent layer's work is
    linear in the padded length (dynamic programming over the cut points, one vectorised step per
    example). Inside a bucket each example is right-padded by repeating its own last token index
    (causal layers never look ahead).
    """
    lengths_np = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths_np)[:-1]])
    order = np.argsort(-lengths_np, kind="stable")
    ordered = lengths_np[order]
    k = len(ordered)
    best = np.zeros(k + 1)  # best[j]: cost of the first j examples
    cut = np.zeros(k + 1, dtype=np.int64)  # cut[j]: where the last bucket of the first j examples starts
    for j in range(1, k + 1):
        first = np.arange(j)
        costs = best[:j] + (j - first) * ordered[:j] + BUCKET_COST_TOKENS
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    bounds, j = [], k
    while j > 0:
        bounds.append((int(cut[j]), j))
        j = int(cut[j])
    plans = []
    for lo, hi in reversed(bounds):
        members = order[lo:hi]
        width = int(lengths_np[members[0]])
        offsets = np.minimum(np.arange(width)[None, :], lengths_np[members, None] - 1)
        plans.append((starts[members, None] + offsets, lengths_np[members]))
    return plans


_PLANS: "weakref.WeakKeyDictionary[attention.SequenceLayout, tuple]" = weakref.WeakKeyDictionary()


def scatter_plan(layout: attention.SequenceLayout, device) -> tuple[list, torch.Tensor]:
    """Buckets `[(gather (G*L,), G, L)]` over the layout's `B * S` tokens (no padding: the layouts
    `layout_from_inputs` derives have none) and the `(B*S,)` index that puts their outputs back in
    token order; once per layout (every layer of a forward shares it)."""
    if layout not in _PLANS:
        lengths = layout.lengths()
        back = np.empty(int(sum(lengths)), dtype=np.int64)
        buckets, offset = [], 0
        for gather, seq_lengths in plan_buckets(lengths):
            count, width = gather.shape
            valid = np.arange(width)[None, :] < seq_lengths[:, None]
            back[gather[valid]] = offset + np.flatnonzero(valid.reshape(-1))
            offset += count * width
            buckets.append((torch.from_numpy(gather.reshape(-1)).to(device), count, width))
        _PLANS[layout] = (buckets, torch.from_numpy(back).to(device))
    return _PLANS[layout]


def run_per_example(forward, args: tuple, kwargs: dict, layout: attention.SequenceLayout,
                    shape: tuple[int, int], attention_layer: bool = False):
    """`forward` on the examples of a packed call, one call per length bucket.

    Per-token arguments `(B, S, ...)` become `(G, L, ...)` right-padded buckets (`scatter_plan`),
    the packed layout's kwargs are dropped, caches, states and padding masks are
    None; per-token outputs come back `(B, S, ...)` in token order. An `attention_layer` (attention
    written inside the model) keeps its causal mask, cut to each bucket, and its ALiBi biases.
    """
    named = _bound_arguments(forward, args, kwargs)
    buckets, back = scatter_plan(layout, layout.cu_seq_lens.device)
    outputs, counts = [], []
    for gather, count, width in buckets:
        outputs.append(forward(**_bucket_arguments(named, shape, gather, count, width, attention_layer)))
        counts.append((count, width))
    return _merge_outputs(outputs, counts, back, shape)


def _hidden_states(forward, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first argument: the layer's `(B, S, D)` input."""
    if args:
        return args[0]
    first = next(iter(inspect.signature(forward).parameters), None)
    return kwargs.get(first)


def _cross_attention(forward, args: tuple, kwargs: dict) -> bool:
    """An attention call over another sequence (an encoder's): not split."""
    named = _bound_arguments(forward, args, kwargs)
    return any(named.get(key) is not None for key in ("key_value_states", "encoder_hidden_states"))


def _restarting_forward(self, *args, **kwargs):
    """A token mixer's forward that keeps packed examples apart (see the module docstring)."""
    forward = self.__dict__.get("_packcollate_inner_forward") or functools.partial(type(self).forward, self)
    layout, shape = _PACKING.layout, _PACKING.shape
    if not _PACKING.active or layout is None or self.__dict__.get("_packcollate_running"):
        return forward(*args, **kwargs)
    hidden = _hidden_states(forward, args, kwargs)
    attention_layer = self.__dict__.get("_packcollate_kind") == "attention"
    matches = isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 and tuple(hidden.shape[:2]) == shape
    if attention_layer and not matches:  # another sequence (a vision or audio tower's): not the packed row
        return forward(*args, **kwargs)
    if not matches:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(
            f"{type(self).__name__}: packcollate runs this layer's packed examples apart and expected hidden states "
            f"of the packed batch's {shape} tokens (B, S, ...), got {got}; train this architecture with padding "
            f"(PaddedCollator)"
        )
    if attention_layer and _cross_attention(forward, args, kwargs):
        return forward(*args, **kwargs)
    if not attention_layer and uses_kernels(self, hidden.device):
        return forward(*args, **_layout_kwargs(forward, layout, shape, kwargs))
    self.__dict__["_packcollate_running"] = True
    try:
        return run_per_example(forward, args, kwargs, layout, shape, attention_layer)
    except (RuntimeError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(
            f"{type(self).__name__}: packcollate could not run this layer's packed examples apart "
            f"({type(error).__name__}: {error}); train this architecture with padding (PaddedCollator)"
        ) from error
    finally:
        self.__dict__["_packcollate_running"] = False


# ---------------------------------------------------------------------------------------------
# Installing the hooks
# ---------------------------------------------------------------------------------------------


def restart_token_mixers(model: torch.nn.Module) -> list[str]:
    """Make `model`'s token mixers restart at every packed example when it runs with
    `attn_implementation="packcollate"`; returns their names. Idempotent; done for every model
    built after `import packcollate` (no need to call it then).

    The model and every transformers model inside it get a hook that reads the packed layout of each
    call; each outermost token mixer gets a forward that runs its examples apart.
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not module.__dict__.get("_packcollate_layout_hook"):
            module.register_forward_pre_hook(_before_model, with_kwargs=True)
            module.register_forward_hook(_after_model, with_kwargs=True, always_call=True)
            module.__dict__["_packcollate_layout_hook"] = True
    names = []
    internal = internal_attention_layers(model)
    for kind, layers in (("mixer", token_mixers(model)), ("attention", internal)):
        for name, layer in layers:
            if "_packcollate_inner_forward" not in layer.__dict__:
                layer.__dict__["_packcollate_inner_forward"] = layer.__dict__.get("forward")  # accelerate's, or None
                layer.__dict__["_packcollate_kind"] = kind
                layer.forward = types.MethodType(_restarting_forward, layer)
            names.append(name)
    if internal and not any(_ATTENTION_CLASS.search(type(m).__name__) and _names_interface(type(m)) for m in model.modules()):
        # every attention layer is internal: the model's masks are theirs (not a vision tower's only)
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                module.__dict__["_packcollate_internal_attention"] = True
    return names


def _post_init_installing(post_init):
    @functools.wraps(post_init)
    def wrapped(self, *args, **kwargs):
        result = post_init(self, *args, **kwargs)
        restart_token_mixers(self)
        return result

    wrapped._packcollate = True
    return wrapped


def _register_gpt_neo() -> None:
    """GPT-Neo picks its attention class by backend name, and knows no `packcollate`: under it, its
    eager class (attention written inside the model, run per example like the others)."""
    try:
        from transformers.models.gpt_neo import modeling_gpt_neo
    except ImportError:
        return
    classes = getattr(modeling_gpt_neo, "GPT_NEO_ATTENTION_CLASSES", None)
    if isinstance(classes, dict) and "eager" in classes:
        classes.setdefault(attention.BACKEND_NAME, classes["eager"])


def register() -> None:
    """Every transformers model installs `restart_token_mixers` when built (`post_init`); the
    packcollate mask asks for the mask width of models with internal attention layers; GPT-Neo
    accepts the backend."""
    from transformers import PreTrainedModel

    if not getattr(PreTrainedModel.post_init, "_packcollate", False):
        PreTrainedModel.post_init = _post_init_installing(PreTrainedModel.post_init)
    attention.internal_attention_mask_width = _internal_attention_mask_width
    _register_gpt_neo()
