"""Recurrent, convolutional and linear-attention layers, and attention written inside the model,
restarted at every packed example.

SSM mixers (Mamba, Mamba-2), short convolutions (LFM2), gated delta nets (Qwen3.5, Qwen3-Next),
lightning attention (MiniMax), RG-LRU blocks (RecurrentGemma), RWKV and xLSTM layers carry state
from token to token: run over a packed row `(1, N, D)` they carry it from one example into the next.
In a model `packcollate.prepare` prepared, on the packcollate backend, every such layer ("token
mixer") sees its examples apart:

- with the fast kernels (CUDA, and every kernel function the layer calls over whole sequences is
  the installed `mamba_ssm` / `causal_conv1d` / `fla` one and takes `seq_idx` or `cu_seqlens`: read
  from transformers' kernel wrappers at run time), the layer runs packed, with the `seq_idx` /
  `cu_seq_lens_q` its kernels read (filled in from the layout when the collator did not emit them);
- otherwise its examples are gathered into right-padded batches `(G, L, D)` of similar-length
  examples (`buckets.bucket_plan`: causal layers are exact under right padding), the layer's own
  PyTorch forward runs on each batch with no cache and no `seq_idx`, and the outputs are put back in
  token order `(1, N, D)`. One call per bucket, never per example.

Attention layers written inside the model (no `AttentionInterface`: BLOOM, MPT, XGLM, GPT-Neo, …)
run their examples apart the same way, with the plain causal mask the packcollate mask function
hands such models, cut to each bucket (and BLOOM's ALiBi biases). So do attention layers that read
the 4-D mask themselves before (or instead of) handing it to the backend (`reads_attention_mask`:
sparse-attention indexers fed `attention_mask[:, 0]` (DeepSeek-V3.2, GLM-MoE-DSA, HY-V4, AXK2,
dots3), a block bias concatenated to it (DeepSeek-V4), a dynamic mask built on it (Doge)): once one
layer of a model reads the mask, every attention layer of that model runs per bucket, so the one
mask transformers builds per forward can be the causal mask of one example, `(1, 1, L, L)` with
`L` the longest example, cut per bucket to `(G, 1, L_b, L_b)`: each reader sees an ordinary unpacked
batch (its top-k selects inside the example, its block bias and window count from the example's
start). Memory is `sum_b G_b * L_b ** 2` per layer, linear in the number of examples (not `N x N`).

Attention layers that number their tokens themselves (`torch.arange` over the call in their forward:
Inkling's log-scaled queries, Llama 4's attention temperature; `counts_row_positions`) run per bucket
too, so each counts from its example's start. Positional embeddings that number the tokens themselves
(`arange` over the call, ignoring `position_ids`: the decoders of BART, Marian, Pegasus, MBart, Whisper,
PLBart, …, whose causal LM takes no `position_ids`) restart: their output for the longest example's
positions, gathered at each token's position in its example (`kind="positions"`).

`restart_layer` gives such a layer the forward that does this (`prepare` calls it): it reads the packed forward in
progress (`state.current()`, the layout travelling with the call). Layers are found at run time by
class name, or because they own a depthwise convolution over the tokens; internal attention layers
by their source; `stateful_classes` reads the same from a config's modeling file, for models that
were never prepared. The cache of a packed forward is not filled (a packed row has no single state
to continue from); padded batches (a 2-D `attention_mask` with zeros) run as transformers runs them.
"""

from __future__ import annotations

import ast
import contextvars
import functools
import importlib
import inspect
import re
import sys
import textwrap
import types
from dataclasses import dataclass

import torch

from ..errors import UnsupportedError
from ..layout import PACKING_KEYS, SequenceLayout, example_index, example_positions
from . import state
from .buckets import RECURRENT_COST, SAME_LENGTH_COST, bucket_plan
from .patches import pools_into_patches
from .traced import chunk_size

# class names of layers that carry state along the sequence (Mamba mixers, short convolutions, gated
# delta nets, lightning/linear attention, RG-LRU, RWKV time and channel mixing, xLSTM)
TOKEN_MIXER_CLASS = re.compile(
    r"Mixer$|MambaLayer$|ShortConv|DeltaNet$|DeltaAttention$|LightningAttention$|Rglru$|RecurrentBlock$|"
    r"^Rwkv(SelfAttention|FeedForward)$|^xLSTMLayer$|ShortConvolution$|CCAProjection$"
)

# keyword arguments of the packed layout: dropped when the layer runs on padded batches
_LAYOUT_KWARGS = frozenset({*PACKING_KEYS, "cu_seqlens"}) - {"position_ids"}
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
ATTENTION_CLASS = re.compile(r"(Attention|Attn)$")
# what a layer's source names when its attention goes through transformers' AttentionInterface
_INTERFACE_NAMES = ("ALL_ATTENTION_FUNCTIONS", "AttentionInterface", "attention_interface", "packcollate_attention")


@functools.lru_cache(maxsize=None)
def names_interface(cls: type) -> bool | None:
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
    if not (ATTENTION_CLASS.search(cls.__name__) and cls.__module__.startswith("transformers.")):
        return False
    return names_interface(cls) is False and not any(names_interface(type(m)) for m in module.modules())


# parameter names under which a layer receives the attention mask
_MASK_PARAMETERS = frozenset({"attention_mask", "causal_mask", "attn_mask", "mask"})


def _passed_on(node, parent) -> bool:
    """The mask name `node` only passed on: a call argument, an `is None` test, `isinstance`, a branch
    of a conditional expression, an operand of `or`/`and` (a default)."""
    if isinstance(parent, ast.keyword) or (isinstance(parent, ast.Call) and node in parent.args):
        return True
    if isinstance(parent, ast.Compare):
        return all(isinstance(c, ast.Constant) and c.value is None for c in parent.comparators)
    if isinstance(parent, ast.IfExp):
        return node is not parent.test
    return isinstance(parent, ast.BoolOp)


def mask_reads(source: str) -> list[str]:
    """The expressions in which the methods of `source` (a class) read a mask parameter themselves:
    index it, take its dtype or shape, add, concatenate or combine it, … (not passing it on). A helper
    function the mask is handed to is not followed: `_read_stateful_classes` and `_reads_mask_inside`
    look into the classes a layer builds; a reader they miss still gets the sequence map or None, never
    a packed `N x N` mask, and `packcollate check` proves the result numerically."""
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return []
    reads = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        arguments = function.args
        names = _MASK_PARAMETERS & {a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]}
        if not names:
            continue
        parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(function):
            if (isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load)
                    and not _passed_on(node, parents.get(node))):
                reads.append(ast.unparse(parents.get(node, node)))
    return reads


@functools.cache
def reads_attention_mask(cls: type) -> bool:
    """Whether `cls`'s own methods read the attention mask they receive (`attention_mask[:, 0]`, its
    dtype, `torch.cat([attention_mask, bias])`, …) rather than only passing it on: read from its
    source (AST), at run time. False when the source cannot be read."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return bool(mask_reads(source))


def _reads_mask_inside(module: torch.nn.Module) -> bool:
    """An attention layer going through the AttentionInterface that reads the mask itself, or holds a
    layer that does (an indexer)."""
    cls = type(module)
    return (bool(ATTENTION_CLASS.search(cls.__name__)) and bool(names_interface(cls))
            and any(reads_attention_mask(type(m)) for m in module.modules()))


def mask_reading_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost attention layers of `model` that read the 4-D mask themselves (sparse indexers,
    block biases, dynamic masks; see the module docstring), found from their source at run time."""
    return _outermost(model, _reads_mask_inside)


def interface_attention_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost attention layers of `model` that go through the AttentionInterface (and are not
    token mixers): in a model with a mask-reading layer, all of them run per bucket."""
    return _outermost(model, lambda m: bool(ATTENTION_CLASS.search(type(m).__name__)) and bool(names_interface(type(m)))
                      and not is_token_mixer(m))


def per_bucket_attention_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The attention layers `prepare` runs per bucket: those written inside the model, those that number
    their tokens themselves (`row_position_attention_layers`), and, when any attention layer reads the
    mask itself, every attention layer of the model."""
    layers = dict(internal_attention_layers(model))
    layers.update(row_position_attention_layers(model))
    if mask_reading_layers(model):
        layers.update(interface_attention_layers(model))
    names = list(layers)
    return [(name, layers[name]) for name in names if not any(name.startswith(other + ".") for other in names)]


def attention_per_bucket(model: torch.nn.Module) -> bool:
    """Every attention layer of `model` runs per bucket (`per_bucket_attention_layers`): the mask
    function then hands the causal mask of one example, cut per bucket."""
    return attention_all_internal(model) or bool(mask_reading_layers(model))


@functools.cache
def counts_row_positions(cls: type) -> bool:
    """Whether an attention class that goes through the AttentionInterface numbers its tokens itself in its
    forward (`torch.arange` over the call's length: Inkling's log-scaled queries, Llama 4's attention
    temperature): over a packed row those are row positions, not each example's own."""
    owner = next((klass for klass in cls.__mro__ if "forward" in vars(klass)), None)
    if owner is None or not ATTENTION_CLASS.search(cls.__name__) or not names_interface(cls):
        return False
    try:
        return "torch.arange(" in inspect.getsource(owner.forward)
    except (OSError, TypeError):
        return False


def row_position_attention_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost attention layers of `model` that number their tokens themselves (`counts_row_positions`):
    they run their examples apart under the packcollate backend, so each counts from its example's start."""
    return _outermost(model, lambda module: type(module).__module__.startswith("transformers.")
                      and counts_row_positions(type(module)) and not is_token_mixer(module)
                      and chunk_size(module) is None)  # chunked layers keep their chunks only on the packed row


# class names of modules that embed token positions (learned or sinusoidal tables)
POSITION_CLASS = re.compile(r"Position(al)?Embeddings?$")


def _takes_position_ids(model_class: type) -> bool:
    return "position_ids" in inspect.signature(model_class.forward).parameters


def row_position_embeddings(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The positional embeddings of `model` when its outermost transformers model takes no `position_ids` (its
    positions are `arange` over the call, the packed row's: BART-style decoders, Whisper's, …): they restart at
    every packed example once prepared."""
    from transformers import PreTrainedModel

    outermost = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if outermost is None or _takes_position_ids(type(outermost)):
        return []
    return [(name, layer) for name, layer in model.named_modules()
            if POSITION_CLASS.search(type(layer).__name__) and type(layer).__module__.startswith("transformers.")]


def internal_attention_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost attention layers of `model` that compute attention themselves, not through
    transformers' `AttentionInterface` (BLOOM, MPT, XGLM, GPT-2-era models): read from their source
    at run time. Like token mixers, they run their examples apart under the packcollate backend."""
    return _outermost(model, lambda module: _writes_attention_inside(module) and not is_token_mixer(module))


def attention_all_internal(model: torch.nn.Module) -> bool:
    """Every attention layer of `model` computes attention inside the model (BLOOM, GPT-Neo, Falcon up to
    transformers 5.24): the backend name decides only the mask transformers builds for them."""
    return bool(internal_attention_layers(model)) and not any(
        ATTENTION_CLASS.search(type(m).__name__) and names_interface(type(m)) for m in model.modules()
    )


def _outermost(model: torch.nn.Module, predicate) -> list[tuple[str, torch.nn.Module]]:
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if module is model or any(name.startswith(parent + ".") for parent, _ in found):
            continue
        if predicate(module):
            found.append((name, module))
    return found


_CONV_SOURCE = re.compile(r"nn\.Conv1d\([^)]*groups\s*=")


@dataclass(frozen=True)
class StatefulClasses:
    """What a model of one config class needs `prepare` for, read from its modeling file.

    Attributes:
        mixers: class names of its token mixers (layers carrying state along the sequence).
        internal: every attention class it defines computes attention inside the model.
        mask_readers: class names of its attention layers that read the 4-D mask themselves.
        positions: class names of its positional embeddings that number the packed row's tokens (its
            causal LM takes no `position_ids`).
        row_counting: class names of its attention layers that number their tokens themselves
            (`counts_row_positions`: Inkling, Llama 4's attention temperature).
        patching: its model pools tokens into patches (BLT: `patches.pools_into_patches`).
    """

    mixers: tuple[str, ...] = ()
    internal: bool = False
    mask_readers: tuple[str, ...] = ()
    positions: tuple[str, ...] = ()
    row_counting: tuple[str, ...] = ()
    patching: bool = False

    def __bool__(self) -> bool:
        return bool(self.mixers or self.internal or self.mask_readers or self.positions or self.row_counting
                    or self.patching)


# config class -> what its models need `prepare` for (read once per class; a dict lookup, so that
# `torch.compile` traces it without a break once the class is known)
_STATEFUL: dict[type, StatefulClasses] = {}


def stateful_classes(config_class: type) -> StatefulClasses:
    """What a model of `config_class` needs `prepare` for, read from its modeling file (no model is
    built): its token mixers, whether every attention class it defines computes attention inside the
    model, and its attention classes (going through the AttentionInterface) that read the mask
    themselves or build a class that does (an indexer), its positional embeddings that number the
    packed row's tokens (its causal LM takes no `position_ids`), and its attention classes that number
    their tokens themselves. Empty when the modeling file cannot be found
    (remote code: `prepare` reads the model itself)."""
    found = _STATEFUL.get(config_class)
    if found is None:
        found = _STATEFUL[config_class] = _read_stateful_classes(config_class)
    return found


@torch.compiler.disable
def _read_stateful_classes(config_class: type) -> StatefulClasses:
    name = config_class.__module__.replace(".configuration_", ".modeling_")
    try:
        module = importlib.import_module(name)
    except ImportError:
        return StatefulClasses()
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and issubclass(value, torch.nn.Module) and value.__module__ == name]
    sources = {}
    for cls in classes:
        try:
            sources[cls] = inspect.getsource(cls)
        except (OSError, TypeError):
            sources[cls] = ""
    mixers = [cls.__name__ for cls in classes if TOKEN_MIXER_CLASS.search(cls.__name__) or _CONV_SOURCE.search(sources[cls])]
    causal_lms = [cls for cls in classes if cls.__name__.endswith(("ForCausalLM", "LMHeadModel"))]
    positions = ([cls.__name__ for cls in classes if POSITION_CLASS.search(cls.__name__)]
                 if causal_lms and not any(_takes_position_ids(cls) for cls in causal_lms) else [])
    attention = [cls for cls in classes if ATTENTION_CLASS.search(cls.__name__)]
    internal = bool(attention) and all(names_interface(cls) is False for cls in attention)
    readers = [cls.__name__ for cls in attention if names_interface(cls) and any(
        reads_attention_mask(inner) for inner in classes
        if inner is cls or re.search(rf"\b{re.escape(inner.__name__)}\(", sources[cls]))]
    configs = vars(sys.modules.get(config_class.__module__, module)).values()
    patching = any(isinstance(value, type) and pools_into_patches(value) for value in configs)
    return StatefulClasses(tuple(sorted(mixers)), internal, tuple(sorted(readers)), tuple(sorted(positions)),
                           tuple(sorted(cls.__name__ for cls in attention if counts_row_positions(cls))), patching)


# ---------------------------------------------------------------------------------------------
# Kernels that keep packed examples apart themselves
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


# ---------------------------------------------------------------------------------------------
# Running a layer on its examples
# ---------------------------------------------------------------------------------------------


def _layout_kwargs(forward, layout: SequenceLayout, shape, kwargs: dict) -> dict:
    """`kwargs` with `seq_idx` `(B, S)` int32 and `cu_seq_lens_q/_k` `(k+1,)` from `layout` where the
    caller passed none and `forward` takes them (transformers hands each kernel the ones it takes)."""
    kwargs = dict(kwargs)
    if kwargs.get("seq_idx") is None and _accepts(forward, "seq_idx"):
        kwargs["seq_idx"] = example_index(layout.cu_seq_lens).to(torch.int32).view(*shape)
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
    """A per-token tensor `(B, S, ...)` (or a tuple of them, or a dict of either: DeepSeek-V4's rotary
    tables per layer type) gathered by `take`; anything else as is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == shape:
        return take(value.reshape(shape[0] * shape[1], *value.shape[2:]))
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_split_value(v, shape, take) for v in value)
    if isinstance(value, dict):
        return {key: _split_value(v, shape, take) for key, v in value.items()}
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
        outputs = _same_trailing_shape(outputs)
        if outputs is None:
            return None
        flat = torch.cat([o.reshape(-1, *o.shape[2:]) for o in outputs]).index_select(0, back)
        return flat.view(*shape, *flat.shape[1:])
    if all(o is first for o in outputs):
        return first  # the same tensor from every bucket (a layer's bias)
    return None  # a bucket's recurrent state or attention weights: no place in the packed row


def run_per_example(forward, args: tuple, kwargs: dict, layout: SequenceLayout,
                    shape: tuple[int, int], attention_layer: bool = False, cost=RECURRENT_COST):
    """`forward` on the examples of a packed call, one call per length bucket.

    Per-token arguments `(B, S, ...)` become `(G, L, ...)` right-padded buckets (`buckets.bucket_plan`
    under `cost`), the packed layout's kwargs are dropped, caches, states and padding masks are
    None; per-token outputs come back `(B, S, ...)` in token order. An `attention_layer` keeps its
    one-example mask, cut to each bucket, and its ALiBi biases.
    """
    named = _bound_arguments(forward, args, kwargs)
    plan = bucket_plan(layout, layout.cu_seq_lens.device, cost)
    outputs, counts = [], []
    for bucket in plan.buckets:
        outputs.append(forward(**_bucket_arguments(named, shape, bucket.gather, bucket.count, bucket.width,
                                                   attention_layer)))
        counts.append((bucket.count, bucket.width))
    return _merge_outputs(outputs, counts, plan.back, shape)


def _same_trailing_shape(outputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Per-bucket outputs `(G, L, ...)` with one trailing shape. Integer outputs whose last dimension
    follows the bucket (an indexer's top-k indices, `min(k, L)` of them) are padded to the widest by
    repeating their last index (selecting a key twice selects it once); None for any other mismatch."""
    trailing = {tuple(o.shape[2:]) for o in outputs}
    if len(trailing) == 1:
        return outputs
    if any(o.dtype.is_floating_point or o.dim() < 3 for o in outputs) or len({t[:-1] for t in trailing}) != 1:
        return None
    widest = max(t[-1] for t in trailing)
    return [o if o.shape[-1] == widest else torch.cat([o, o[..., -1:].expand(*o.shape[:-1], widest - o.shape[-1])], -1)
            for o in outputs]
def run_positions_per_example(forward, args: tuple, kwargs: dict, layout: SequenceLayout, shape: tuple[int, int]):
    """A positional embedding that numbers the call's `S` tokens `0 … S-1` itself, on a packed call: its output
    for the first `L` positions (`L` the longest example; every `(B, S, …)` / `(S,)` / shape argument cut to
    `L`), gathered at each token's position in its example -> `(B, S, D)`. A table shorter than the packed row
    is never indexed past the longest example."""
    batch, seq = shape
    width = layout.max_length
    given = _bound_arguments(forward, args, kwargs).get("position_ids")
    if isinstance(given, torch.Tensor) and given.shape[-1] == seq and not torch.equal(
            given.reshape(-1, seq)[0], torch.arange(seq, device=given.device)):
        return forward(*args, **kwargs)  # positions handed in that restart already (the collator's position_ids)

    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == shape:
            return value[:, :width]
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == seq:
            return value[:width]
        if isinstance(value, tuple) and len(value) >= 2 and all(isinstance(v, int) for v in value) \
                and tuple(value[:2]) == shape:
            return type(value)((batch, width, *value[2:]))
        return value

    cut_args, cut_kwargs = [cut(value) for value in args], {key: cut(value) for key, value in kwargs.items()}
    if all(a is b for a, b in zip([*args, *kwargs.values()], [*cut_args, *cut_kwargs.values()])):
        return forward(*args, **kwargs)  # not the packed row's tokens (another tower's): as it is
    out = forward(*cut_args, **cut_kwargs)
    if not (isinstance(out, torch.Tensor) and out.dim() in (2, 3) and out.shape[-2] == width
            and (out.dim() == 2 or out.shape[0] in (1, batch))):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"expected positions (B|1, {width}, D) or ({width}, D), got {got}")
    in_example = example_positions(layout.cu_seq_lens)
    flat = torch.zeros(batch * seq, dtype=torch.long, device=in_example.device)
    flat = flat.index_copy(0, layout.token_index, in_example) if layout.token_index is not None else in_example
    index = flat.view(batch, seq).to(out.device)
    table = out if out.dim() == 2 else out.expand(batch, -1, -1)
    if table.dim() == 2:
        return table[index]
    return table[torch.arange(batch, device=out.device)[:, None], index]


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


# layers running their examples apart in this context: any restarted layer called inside one of their
# buckets (a short convolution inside Inkling's attention, a layer whose forward reaches itself) runs as it is
_RUNNING: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("packcollate_running", default=frozenset())


#: what `restart_layer` restarts: token mixers, attention layers (right-padded length buckets), attention
#: layers of a model with a layer that reads the mask (one bucket per distinct length: `SAME_LENGTH_COST`),
#: positional embeddings numbering the tokens themselves (`run_positions_per_example`)
LAYER_KINDS = ("mixer", "attention", "mask-reading", "positions")


def restart_layer(layer: torch.nn.Module, kind: str) -> None:
    """Give a token mixer (`kind="mixer"`), an attention layer written inside the model or numbering
    its tokens itself (`kind="attention"`), an attention layer of a model whose layers read the mask
    (`kind="mask-reading"`) or a positional embedding that numbers the tokens itself
    (`kind="positions"`) the forward that runs its packed examples apart (`_restarted_forward`);
    idempotent. A bound method, so a deep copy of the model restarts its own layers."""
    if kind not in LAYER_KINDS:
        raise ValueError(f"restart_layer: kind must be one of {LAYER_KINDS}, got {kind!r}")
    if "_packcollate_kind" not in layer.__dict__:
        layer.__dict__["_packcollate_inner_forward"] = layer.__dict__.get("forward")  # accelerate's, or None
        layer.__dict__["_packcollate_kind"] = kind
        layer.forward = types.MethodType(_restarted_forward, layer)


def is_restarted(layer: torch.nn.Module) -> bool:
    """Whether `restart_layer` gave `layer` its restarting forward."""
    return "_packcollate_kind" in layer.__dict__


def _restarted_forward(self, *args, **kwargs):
    """The layer's own forward on its packed examples apart, as the module docstring says; any other
    call (no packed forward in progress, another backend, a tower's own sequence) runs it as it is."""
    inner = self.__dict__.get("_packcollate_inner_forward") or functools.partial(type(self).forward, self)
    kind = self.__dict__["_packcollate_kind"]
    attention_layer = kind in ("attention", "mask-reading")
    packed = state.current()
    if packed is None and state.in_backward():
        raise UnsupportedError(
            f"{type(self).__name__}: recomputed during backward outside a checkpointed transformers layer, so "
            f"packcollate cannot tell which packed batch it belongs to; checkpoint with "
            f"model.gradient_checkpointing_enable() (each GradientCheckpointingLayer remembers its layout)"
        )
    if packed is None and any(isinstance(kwargs.get(key), torch.Tensor) for key in _LAYOUT_KWARGS):
        raise UnsupportedError(
            f"{type(self).__name__}: called with a packed layout ({', '.join(sorted(_LAYOUT_KWARGS & set(kwargs)))}) "
            f"outside a forward of its prepared model; call the model itself, so that its examples run apart"
        )
    if packed is None or not packed.active or packed.layout is None or _RUNNING.get():  # inside a bucket: as is
        return inner(*args, **kwargs)
    layout, shape = packed.layout, packed.shape
    if self.__dict__["_packcollate_kind"] == "positions":
        try:
            return run_positions_per_example(inner, args, kwargs, layout, shape)
        except (RuntimeError, TypeError, IndexError) as error:
            raise UnsupportedError(
                f"{type(self).__name__}: packcollate could not restart these positions at every packed example "
                f"({type(error).__name__}: {error}); train this architecture with padding (PaddedCollator)"
            ) from error
    hidden = _hidden_states(inner, args, kwargs)
    matches = isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 and tuple(hidden.shape[:2]) == shape
    if not matches:  # inside the packed model's own call (a tower's call has no layout: `preparation.py`)
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise UnsupportedError(
            f"{type(self).__name__}: packcollate runs this layer's packed examples apart and expected hidden "
            f"states of the packed batch's {shape} tokens (B, S, ...), got {got}; train this architecture with "
            f"padding (PaddedCollator)"
        )
    if attention_layer and _cross_attention(inner, args, kwargs):
        return inner(*args, **kwargs)
    if not attention_layer and uses_kernels(self, hidden.device):
        return inner(*args, **_layout_kwargs(inner, layout, shape, kwargs))
    token = _RUNNING.set(_RUNNING.get() | {id(self)})
    try:
        return run_per_example(inner, args, kwargs, layout, shape, attention_layer,
                               SAME_LENGTH_COST if kind == "mask-reading" else RECURRENT_COST)
    except (RuntimeError, TypeError, AttributeError, IndexError) as error:
        raise UnsupportedError(
            f"{type(self).__name__}: packcollate could not run this layer's packed examples apart "
            f"({type(error).__name__}: {error}); train this architecture with padding (PaddedCollator)"
        ) from error
    finally:
        _RUNNING.reset(token)
