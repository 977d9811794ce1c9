"""The packed layout: the one module that builds it, derives it and checks it.

For examples of lengths `l_0 … l_{k-1}`, `N = sum(l_i)`, a packed batch carries (the keys are Hugging
Face's `FlashAttentionKwargs`, so a batch goes straight into `model(**batch)`):

| key | shape, dtype | value |
| --- | --- | --- |
| `input_ids`, `labels` | `(1, N)` int64 | the tokens; labels are token ids or `IGNORE_INDEX` |
| `position_ids` | `(1, N)` int64 | `0 … l_i-1` for every example (`+ position_start`) |
| `cu_seq_lens_q`, `cu_seq_lens_k` | `(k+1,)` int32 | `[0, l_0, l_0+l_1, …, N]` |
| `max_length_q`, `max_length_k` | Python int | `max(l_i)` |
| `seq_idx` | `(1, N)` int32, optional | the example index of every token |
| `bidirectional_block_ids` | `(1, N)` int64, vision only | tokens of one id >= 0 see each other inside their example; -1 elsewhere |

Three jobs, each done here only:

- build (numpy, for the collators): `cumulative`, `positions`, `packing_keys`;
- derive (torch, for the attention backend and the layers it restarts): a `SequenceLayout` from
  `cu_seq_lens_*`, `position_ids`, `seq_idx`, the backend's sequence map or a padding mask
  (`layout_of_call`, `layout_of_inputs`, `SequenceLayout.chunked`), and per-token sequence ids for
  `torch.compile` (`traced_sequence_ids`: tensor operations only, no device sync);
- check a layout a caller hands over before it is trusted (`check_cu_seq_lens`, `checked_position_ids`,
  `check_padding_mask`, `checked_block_ids`): a malformed one would silently mix examples or fail
  deep inside a kernel, so it raises `LayoutError` naming the argument, what was expected and what
  was given.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import LayoutError

#: The label of a token that is not a target (the first token of every example, prompt tokens, padding).
IGNORE_INDEX = -100
#: The name the attention backend that reads this layout registers with transformers.
BACKEND_NAME = "packcollate"
#: The kwarg that names bidirectional blocks: `(B|1, S)` integer, -1 outside blocks.
BLOCK_IDS = "bidirectional_block_ids"
#: The varlen kernels' keyword arguments (transformers' `FlashAttentionKwargs`).
FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
#: Every key a packing collator computes: an example that carries one would be overwritten.
PACKING_KEYS = ("position_ids", *FLASH_KWARGS, "seq_idx")


# ---------------------------------------------------------------------------------------------
# Build (numpy)
# ---------------------------------------------------------------------------------------------

_ARANGE = np.arange(1 << 16, dtype=np.int64)


def cumulative(lengths: np.ndarray) -> np.ndarray:
    """`(k+1,)` int64 `[0, l_0, l_0+l_1, …]` from `(k,)` lengths."""
    cu_seq_lens = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seq_lens[1:])
    return cu_seq_lens


def positions(cu_seq_lens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`(N,)` int64 position of each token in its sequence: `0 … l_i-1` for every sequence.

    `arange(N) - repeat(starts, lengths)`, computed in place from a cached `arange` (one pass fewer).
    """
    global _ARANGE
    total = int(cu_seq_lens[-1])
    arange = _ARANGE  # one read: another thread may replace the cache meanwhile
    if total > len(arange):
        arange = _ARANGE = np.arange(1 << total.bit_length(), dtype=np.int64)
    starts = np.repeat(cu_seq_lens[:-1], lengths)
    return np.subtract(arange[:total], starts, out=starts)


def packing_keys(lengths: np.ndarray, cu_seq_lens: np.ndarray | None = None, *, position_start: int = 0,
                 flash_kwargs: bool = True, seq_idx: bool = False) -> dict:
    """The layout keys of sequences of `lengths` `(k,)` packed into one row, as numpy arrays:
    `position_ids` `(1, N)` int64, with `flash_kwargs` `cu_seq_lens_q/_k` `(k+1,)` int32 and
    `max_length_q/_k` (ints), with `seq_idx` `seq_idx` `(1, N)` int32. `cu_seq_lens`: `cumulative(lengths)`
    when the caller has it already."""
    cu_seq_lens = cumulative(lengths) if cu_seq_lens is None else cu_seq_lens
    position_ids = positions(cu_seq_lens, lengths)
    if position_start:
        position_ids += position_start
    keys = {"position_ids": position_ids[None]}
    if flash_kwargs:
        cu32 = cu_seq_lens.astype(np.int32)
        keys.update(cu_seq_lens_q=cu32, cu_seq_lens_k=cu32.copy())
        keys["max_length_q"] = keys["max_length_k"] = int(lengths.max())
    if seq_idx:
        keys["seq_idx"] = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)[None]
    return keys


def to_torch(batch: dict) -> dict:
    """The numpy arrays of `batch` as torch tensors (sharing memory); other values as they are."""
    return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for key, value in batch.items()}


def example_index(cu_seq_lens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Example index of every token `(N,)` int64 from `(k+1,)` offsets: `[0]*l_0 + [1]*l_1 + …`."""
    cu = torch.as_tensor(cu_seq_lens).long()
    total = int(cu[-1]) if total is None else total
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1], output_size=total)


def example_positions(cu_seq_lens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Position of every token in its example `(N,)` int64 from `(k+1,)` offsets: `[0 … l_0-1, 0 … l_1-1, …]`
    (`positions`' torch twin)."""
    cu = torch.as_tensor(cu_seq_lens).long()
    total = int(cu[-1]) if total is None else total
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu.device) - starts


# ---------------------------------------------------------------------------------------------
# Derive (torch)
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SequenceLayout:
    """Where the sequences of a batch are, over its flattened `B * S` tokens.

    Attributes:
        cu_seq_lens: `(k+1,)` int32 on the batch's device, `[0, l_0, l_0+l_1, …, M]`.
        max_length: `max(l_i)`, a Python int.
        token_index: `(M,)` int64, the flat indices of real tokens, or None when all `B * S` are
            real (no padding).
        full_rows: every row of the batch is exactly one sequence (no gather needed).
    """

    cu_seq_lens: torch.Tensor
    max_length: int
    token_index: torch.Tensor | None = None
    full_rows: bool = False
    _lengths: list[int] | None = field(default=None, repr=False)
    _derived: dict = field(default_factory=dict, repr=False)

    def lengths(self) -> list[int]:
        """Sequence lengths as Python ints (one device sync, then kept)."""
        if self._lengths is None:
            self._lengths = torch.diff(self.cu_seq_lens).tolist()
        return self._lengths

    def derived(self, key, compute):
        """`compute()` once per layout and `key` (e.g. a kernel's bucket plan): every layer of a
        forward shares the layout, so what is derived from it is derived once per forward."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def chunked(self, chunk: int) -> SequenceLayout:
        """Every sequence cut into chunks of `chunk` tokens from its own start (the last one shorter):
        the layout of a chunked-attention layer (Llama 4)."""
        lengths = torch.diff(self.cu_seq_lens.long())
        pieces = torch.div(lengths + chunk - 1, chunk, rounding_mode="floor")
        starts = torch.repeat_interleave(self.cu_seq_lens[:-1].long(), pieces)
        first = torch.repeat_interleave(torch.cumsum(pieces, 0) - pieces, pieces)
        starts = starts + chunk * (torch.arange(len(starts), device=starts.device) - first)
        cu = torch.cat([starts, self.cu_seq_lens[-1:].long()]).to(torch.int32)
        return SequenceLayout(cu, min(self.max_length, chunk), self.token_index, False)


class LayoutCache:
    """Remember the layout derived from a tensor for as long as that tensor is unchanged.

    Every layer of a forward sees the same `cu_seq_lens_q` / `position_ids` / mask tensor; the
    layout (which may need a device sync) is derived once per forward, not once per layer. A memo of
    a pure function of the tensor's content: it holds no state of any forward.

    Bounded: at most `size` entries and `max_tokens` tokens of layouts in all (a bigger batch is not
    cached: its layout, O(N), is derived again in each layer), and an entry goes as soon as its
    tensor is freed. A CPU tensor is also compared with a copy taken when its layout was cached: an
    edit through `.numpy()` or `.data` does not bump `tensor._version`. (On CUDA that comparison
    would cost a device sync per layer: edit there with ordinary in-place operations, or not at all.)
    """

    def __init__(self, size: int = 8, max_tokens: int = 1 << 20):
        self.size = size
        self.max_tokens = max_tokens
        # (weak reference, version, extra key, layout, tokens, CPU copy or None)
        self.entries: list[tuple] = []
        self._lock = threading.RLock()  # `_drop` runs from the garbage collector, maybe inside `put`

    def get(self, tensor: torch.Tensor, extra: tuple) -> SequenceLayout | None:
        if tensor.is_inference():  # no version counter (torch.inference_mode): never cached
            return None
        for ref, version, key, layout, _, copy in self.entries:
            if ref() is tensor and version == tensor._version and key == extra:
                return layout if copy is None or torch.equal(copy, tensor) else None
        return None

    def _drop(self, ref: weakref.ref) -> None:
        with self._lock:
            self.entries = [e for e in self.entries if e[0] is not ref]

    def put(self, tensor: torch.Tensor, extra: tuple, layout: SequenceLayout, tokens: int) -> SequenceLayout:
        if tensor.is_inference() or tokens > self.max_tokens:
            return layout
        copy = tensor.detach().clone() if tensor.device.type == "cpu" else None
        with self._lock:
            entries = [e for e in self.entries if e[0]() is not None and not (e[0]() is tensor and e[2] == extra)]
            entries = entries[-(self.size - 1) :]
            while entries and sum(e[4] for e in entries) + tokens > self.max_tokens:
                entries.pop(0)
            self.entries = [*entries, (weakref.ref(tensor, self._drop), tensor._version, extra, layout, tokens, copy)]
        return layout

    def tokens(self) -> int:
        """Tokens of the layouts held now (at most `max_tokens`)."""
        return sum(e[4] for e in self.entries)


_CACHE = LayoutCache()


def from_cu_seq_lens(cu_seq_lens: torch.Tensor, max_length, batch: int, seq: int) -> SequenceLayout:
    """The layout `(k+1,)` cumulative lengths give `(B, S)` tokens, checked first (`check_cu_seq_lens`)."""
    check_cu_seq_lens_type(cu_seq_lens)
    cached = _CACHE.get(cu_seq_lens, (batch, seq))
    if cached is not None:
        return cached
    max_length = check_cu_seq_lens(cu_seq_lens, batch, seq, max_length)
    cu = cu_seq_lens.to(torch.int32, copy=True)  # never the source itself: the cache holds it only weakly
    full_rows = cu.numel() == batch + 1 and max_length == seq
    return _CACHE.put(cu_seq_lens, (batch, seq), SequenceLayout(cu, max_length, None, full_rows), batch * seq)


def from_starts(starts: torch.Tensor, real: torch.Tensor | None = None) -> SequenceLayout:
    """Layout from `(B, S)` bool sequence starts and an optional `(B, S)` bool real-token mask."""
    batch, seq = starts.shape
    starts = starts.clone()
    starts[:, 0] = True
    token_index = None
    flat_starts = starts.reshape(-1)
    if real is not None and not bool(real.all()):
        flat_real = real.reshape(-1)
        token_index = torch.nonzero(flat_real).squeeze(1)
        # a real token starts a sequence where it starts one, or where the previous flat token is padding
        previous_pad = torch.cat([flat_real.new_ones(1), flat_real[:-1]]) == 0
        flat_starts = (flat_starts | previous_pad)[token_index]
    start_index = torch.nonzero(flat_starts).squeeze(1)
    total = flat_starts.numel()
    cu = torch.cat([start_index, start_index.new_tensor([total])]).to(torch.int32)
    lengths = torch.diff(cu)
    max_length = int(lengths.max())
    full_rows = token_index is None and cu.numel() == batch + 1 and max_length == seq
    return SequenceLayout(cu, max_length, token_index, full_rows)


def from_position_ids(position_ids: torch.Tensor, batch: int, seq: int) -> SequenceLayout:
    """A new sequence wherever a position does not continue the one before it: `position_ids` `(B|1, S)`."""
    cached = _CACHE.get(position_ids, (batch, seq))
    if cached is not None:
        return cached
    positions = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    starts = torch.ones(batch, seq, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return _CACHE.put(position_ids, (batch, seq), from_starts(starts), batch * seq)


def from_seq_idx(seq_idx: torch.Tensor) -> SequenceLayout:
    """A new sequence wherever the example index changes: `seq_idx` `(B, S)`."""
    starts = torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return from_starts(starts)


def _identity(tensor: torch.Tensor | None) -> tuple | None:
    """What makes a cached layout stale: the tensor's storage and version, and on CPU its content
    (edits through `.numpy()` / `.data` keep the version); None: not cacheable."""
    if tensor is None:
        return ()
    if tensor.is_inference():
        return None
    content = hash(tensor.detach().contiguous().numpy().tobytes()) if tensor.device.type == "cpu" else None
    return (tensor.data_ptr(), tensor._version, content)


def from_sequence_map(sequence_map: torch.Tensor, batch: int, seq: int, cu_seq_lens: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> SequenceLayout:
    """Layout from the backend's mask: `(B, S)` int32, 0 on padding, a new id at every sequence start
    (a `(B, S)` padding mask given directly reads the same: 0 is padding).

    With `cu_seq_lens` or `position_ids` `(B|1, S)` too, a sequence starts wherever any of them says
    so: the mask can be finer than the examples (chunked-attention layers, Llama 4), and the
    collator's boundaries are the examples (which the mask does not see when a cache exists, nor in
    a padded batch whose rows hold several packed examples).
    """
    extra = (batch, seq, _identity(cu_seq_lens), _identity(position_ids))
    cacheable = None not in extra
    cached = _CACHE.get(sequence_map, extra) if cacheable else None
    if cached is not None:
        return cached
    starts = torch.ones(batch, seq, dtype=torch.bool, device=sequence_map.device)
    starts[:, 1:] = sequence_map[:, 1:] != sequence_map[:, :-1]
    if cu_seq_lens is not None:
        from_cu_seq_lens(cu_seq_lens, None, batch, seq)  # validates that it covers the batch
        starts.view(-1)[cu_seq_lens[:-1].long()] = True
    if position_ids is not None:
        starts[:, 1:] |= position_ids[:, 1:] != position_ids[:, :-1] + 1
    layout = from_starts(starts, sequence_map != 0)
    return _CACHE.put(sequence_map, extra, layout, batch * seq) if cacheable else layout


def is_sequence_map(attention_mask) -> bool:
    """The backend's `(B, S)` int32 map, or a `(B, S)` padding mask given directly (the same rules
    read it: 0 is padding, a sequence starts wherever the value changes)."""
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2


def layout_of_call(batch: int, seq: int, attention_mask, kwargs: dict) -> SequenceLayout | None:
    """The layout of an attention call over `(B, S)` queries and keys, from what reaches it: the
    backend's sequence map (or a padding mask) as `attention_mask`, `cu_seq_lens_q`, `position_ids`;
    None when none says anything (one sequence per row, no padding)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        check_cu_seq_lens_type(cu)
    position_ids = checked_position_ids(kwargs.get("position_ids"), batch, seq)  # None: absent or multi-section
    if is_sequence_map(attention_mask):
        check_padding_mask(attention_mask, batch, seq)
        return from_sequence_map(attention_mask, batch, seq, cu, position_ids)
    if cu is not None:
        return from_cu_seq_lens(cu, kwargs.get("max_length_q"), batch, seq)
    if position_ids is not None:
        return from_position_ids(position_ids, batch, seq)
    return None


def layout_of_inputs(batch: int, seq: int, kwargs: dict) -> SequenceLayout | None:
    """The packed layout of a model call on `(B, S)` tokens from its keyword arguments:
    `cu_seq_lens_q` `(k+1,)`, else `position_ids` `(B|1, S)`, else `seq_idx` `(B, S)`; None when
    none is given, or each row is one sequence."""
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    seq_idx = kwargs.get("seq_idx")
    if isinstance(cu, torch.Tensor):
        layout = from_cu_seq_lens(cu, kwargs.get("max_length_q"), batch, seq)
    elif isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == seq:
        layout = from_position_ids(position_ids, batch, seq)
    elif isinstance(seq_idx, torch.Tensor) and tuple(seq_idx.shape) == (batch, seq):
        layout = from_seq_idx(seq_idx)
    else:
        return None
    return None if layout.full_rows else layout


def traced_sequence_ids(batch: int, seq: int, device, attention_mask, kwargs: dict,
                        chunk: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(B, S)` int64 sequence id of every token, and `(B, S)` bool real tokens (None: all are real),
    with tensor operations only (no device sync, no data-dependent branch: `torch.compile` traces it
    as one graph). A new id wherever `cu_seq_lens_q`, `position_ids` or the backend's mask (a change of
    id, padding 0) starts a sequence, as the eager layout; `chunk`: a chunked-attention layer also
    starts one every `chunk` tokens of an example."""
    starts = torch.zeros(batch, seq, dtype=torch.bool, device=device)  # example starts (cu_seq_lens, position_ids)
    starts[:, 0] = True
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    examples = isinstance(cu_seq_lens, torch.Tensor) and cu_seq_lens.dim() == 1
    if examples:
        starts.view(-1)[cu_seq_lens[:-1].long()] = True
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == seq:
        examples = True
        positions = position_ids.expand(batch, -1)
        starts[:, 1:] |= positions[:, 1:] != positions[:, :-1] + 1
    real = None
    if is_sequence_map(attention_mask):
        real = attention_mask != 0
        if not (chunk and examples):  # a chunked layer counts chunks from the examples, not from the mask
            starts[:, 1:] |= attention_mask[:, 1:] != attention_mask[:, :-1]
    if chunk and examples:
        index = torch.arange(seq, device=device).expand(batch, -1)
        first = torch.cummax(torch.where(starts, index, 0), dim=1).values  # start of each token's example
        starts = starts | ((index - first) % chunk == 0)
    return torch.cumsum(starts, dim=1), real


# ---------------------------------------------------------------------------------------------
# Check
# ---------------------------------------------------------------------------------------------


def _shape(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def check_cu_seq_lens_type(cu_seq_lens, name: str = "cu_seq_lens_q") -> None:
    """A `(k+1,)` integer tensor; a list or a float tensor is refused (the collator returns tensors)."""
    if not isinstance(cu_seq_lens, torch.Tensor):
        raise LayoutError(
            f"{name}: expected a (k+1,) int32 torch tensor of cumulative lengths, got {type(cu_seq_lens).__name__} "
            f"{cu_seq_lens!r:.60}; pass torch.tensor(..., dtype=torch.int32)"
        )
    if cu_seq_lens.dim() != 1 or cu_seq_lens.numel() < 2:
        raise LayoutError(
            f"{name}: expected a (k+1,) tensor of cumulative lengths, got {_shape(cu_seq_lens)}"
            + (" (accelerate's dispatch_batches, its default for an IterableDataset, slices every tensor along dim 0: "
               "train with PackedTrainer, or TrainingArguments(accelerator_config={'dispatch_batches': False}))"
               if cu_seq_lens.numel() == 1 else "")
        )
    if cu_seq_lens.dtype.is_floating_point or cu_seq_lens.dtype.is_complex or cu_seq_lens.dtype == torch.bool:
        raise LayoutError(f"{name}: expected an integer tensor, got dtype {cu_seq_lens.dtype}")


def check_cu_seq_lens(cu_seq_lens: torch.Tensor, batch: int, seq: int, max_length=None,
                      name: str = "cu_seq_lens_q") -> int:
    """Validate `(k+1,)` cumulative lengths covering the `batch * seq` tokens; return `max(l_i)`.

    Expected: `[0, l_0, l_0+l_1, …, batch * seq]`, strictly increasing (every sequence at least one
    token), and `max_length` (when given) at least the longest sequence. One device read.
    """
    check_cu_seq_lens_type(cu_seq_lens, name)
    values = cu_seq_lens.detach().to("cpu", torch.int64).numpy()
    total = batch * seq
    if values[0] != 0:
        shown = values[:8].tolist()
        raise LayoutError(f"{name}: expected cumulative lengths starting at 0, got {shown}{'...' if len(values) > 8 else ''}")
    steps = np.diff(values)
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0])
        raise LayoutError(
            f"{name}: expected strictly increasing cumulative lengths (every sequence at least one token), got "
            f"{int(values[i])} then {int(values[i + 1])} at entries {i} and {i + 1}"
        )
    if values[-1] != total:
        raise LayoutError(
            f"{name}: expected it to end at the batch's {total} tokens ({batch} x {seq}), got {int(values[-1])}; "
            f"was the batch cut or padded after collation?"
        )
    longest = int(steps.max())
    if max_length is not None and int(max_length) < longest:
        raise LayoutError(
            f"max_length_q: expected at least the longest sequence of {name} ({longest}), got {int(max_length)}"
        )
    return longest


def checked_position_ids(position_ids, batch: int, seq: int) -> torch.Tensor | None:
    """`position_ids` when they are one `(B|1, S)` section, None when absent or multi-section
    (multimodal rotary embeddings, 3-D); a 2-D tensor of another shape raises."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return None
    if position_ids.shape[-1] != seq or position_ids.shape[0] not in (1, batch):
        raise LayoutError(
            f"position_ids: expected shape ({batch}, {seq}) or (1, {seq}) like the query's tokens, got "
            f"{tuple(position_ids.shape)}; positions of another length cannot say where the examples start"
        )
    return position_ids


def check_padding_mask(attention_mask: torch.Tensor, batch: int, seq: int) -> None:
    """A `(B, S)` padding mask given directly (1 = real token, 0 = padding): bool or integer, the
    query's shape."""
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise LayoutError(
            f"attention_mask: expected a (B, S) bool or integer padding mask (1 = token, 0 = padding), got dtype "
            f"{attention_mask.dtype}"
        )
    if tuple(attention_mask.shape) != (batch, seq):
        raise LayoutError(
            f"attention_mask: expected a padding mask of shape ({batch}, {seq}) like the query, got "
            f"{tuple(attention_mask.shape)}"
        )


def checked_block_ids(block_ids, batch: int, seq: int) -> torch.Tensor | None:
    """`bidirectional_block_ids` `(B|1, S)` integer (-1: an ordinary token; tokens of one id >= 0 in
    one sequence attend to each other in both directions), as `(B, S)`; None when absent."""
    if block_ids is None:
        return None
    if not isinstance(block_ids, torch.Tensor):
        raise LayoutError(
            f"bidirectional_block_ids: expected a ({batch}, {seq}) integer torch tensor, got {type(block_ids).__name__}"
        )
    if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex or block_ids.dtype == torch.bool:
        raise LayoutError(f"bidirectional_block_ids: expected an integer tensor (-1 outside blocks), got dtype {block_ids.dtype}")
    if block_ids.dim() != 2 or block_ids.shape[-1] != seq or block_ids.shape[0] not in (1, batch):
        raise LayoutError(
            f"bidirectional_block_ids: expected shape ({batch}, {seq}) or (1, {seq}) like the query's tokens, got "
            f"{tuple(block_ids.shape)}; were the batch's tokens cut or padded after collation?"
        )
    return block_ids.expand(batch, seq)
