"""What every mode trains: its batches (fixed, length-grouped, token-budget, TRL BFD rows), collated
once, and the model built from a preset."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...backend import prepare
from ...backend.attention import BACKEND_NAME
from ...batching.sampler import TokenBudgetBatchSampler
from ...collate.text import PackedCollator, PaddedCollator
from ...compat.configs import load_local_config
from ...errors import InputError, is_int
from .config import MODES, PRESETS
from .data import Data


def fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    """Batches of `batch_size` consecutive indices (the last one may be shorter)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: np.ndarray, batch_size: int, mega_batch_mult: int | None = None) -> list[list[int]]:
    """transformers' `group_by_length` without its shuffle: indices in dataset order are cut into
    mega-batches of `mega_batch_mult * batch_size` (default `min(n // (4 * batch_size), 50)`, at
    least 1), each sorted by length (longest first) and cut into batches; the batch holding the
    longest example goes first (so an out-of-memory error shows at once)."""
    n = len(lengths)
    if mega_batch_mult is None:
        mega_batch_mult = max(min(n // (batch_size * 4), 50), 1)
    mega = mega_batch_mult * batch_size
    order = []
    for start in range(0, n, mega):
        chunk = np.arange(start, min(start + mega, n))
        order.extend(chunk[np.argsort(-lengths[chunk], kind="stable")].tolist())
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


@dataclass
class ModeRun:
    """One mode's batches, ready to train on, and what was measured."""

    name: str
    attn_implementation: str
    collator_name: str
    batches: list[dict]  # collated, on the device
    real_tokens: list[int]  # per batch
    computed_tokens: list[int]  # per batch
    examples: int
    collate_seconds: float
    note: str = ""
    times: list[list[float]] = field(default_factory=list)  # per batch, one per repeat
    losses: list[float] = field(default_factory=list)  # every step in order, warm-up included
    peak_mem_bytes: int | None = None
    epoch_loss: float | None = None


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=False) if torch.is_tensor(v) else v for k, v in batch.items()}


def _hf_attention(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            from transformers.utils import is_flash_attn_2_available
        except ImportError:  # pragma: no cover
            return "sdpa"
        return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    return "sdpa"


def _trl_bfd_rows(examples: list[dict], seq_length: int) -> list[dict]:
    """Rows of TRL's `pack_dataset(strategy="bfd")`: each `{input_ids, [labels], seq_lengths}`."""
    import datasets
    from trl.data_utils import pack_dataset

    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        packed = pack_dataset(datasets.Dataset.from_list(examples), seq_length, strategy="bfd")
        return packed.to_list()
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def build_modes(
    data: Data,
    modes: Sequence[str],
    batch_size: int,
    device: torch.device,
    *,
    max_tokens: int | None = None,
    hf_attn: str = "auto",
    seed: int = 0,
) -> tuple[dict[str, ModeRun], int, list[str]]:
    """Collate every mode's batches (on `device`). Returns the runs, `max_tokens` and notes on skipped modes."""
    from transformers import DataCollatorWithFlattening

    examples, lengths = data.examples, data.lengths
    fixed = fixed_batches(len(examples), batch_size)
    mean_real = int(math.ceil(np.mean([lengths[b].sum() for b in fixed])))
    if max_tokens is None:  # the same real tokens per step as the fixed batches: same work, balanced steps
        max_tokens = max(mean_real, int(lengths.max()))
    elif max_tokens < int(lengths.max()):
        raise ValueError(f"--max-tokens: expected at least the longest example ({int(lengths.max())} tokens), "
                         f"got {max_tokens}")
    packed = PackedCollator()
    padded = PaddedCollator.like(packed, pad_token_id=data.pad_token_id)
    notes = []
    plans: dict[str, tuple[list[list[dict]], object, str, str]] = {}
    for mode in modes:
        if mode == "padded":
            plans[mode] = ([[examples[i] for i in b] for b in fixed], padded, "sdpa", "")
        elif mode == "padded-grouped":
            grouped = length_grouped_batches(lengths, batch_size)
            plans[mode] = ([[examples[i] for i in b] for b in grouped], padded, "sdpa",
                           "length-grouped mega-batches (transformers' group_by_length, no shuffle)")
        elif mode == "hf-flatten":
            plans[mode] = ([[examples[i] for i in b] for b in fixed], DataCollatorWithFlattening(),
                           _hf_attention(hf_attn, device), "use_cache=False")
        elif mode == "packcollate":
            plans[mode] = ([[examples[i] for i in b] for b in fixed], packed, BACKEND_NAME, "")
        elif mode == "packcollate-budget":
            sampler = TokenBudgetBatchSampler(lengths, max_tokens, seed=seed, num_replicas=1, rank=0)
            plans[mode] = ([[examples[i] for i in b] for b in sampler], packed, BACKEND_NAME,
                           f"TokenBudgetBatchSampler(max_tokens={max_tokens})")
        elif mode == "trl-bfd":
            try:
                rows = _trl_bfd_rows(examples, max_tokens)
            except ImportError as error:
                notes.append(f"trl-bfd skipped: needs TRL and datasets ({error})")
                continue
            kept = sum(len(r["input_ids"]) for r in rows)
            note = f"trl.data_utils.pack_dataset(seq_length={max_tokens}, strategy='bfd'), one row a step"
            if kept != int(lengths.sum()):
                note += f"; TRL kept {kept} of {int(lengths.sum())} tokens"
            plans[mode] = ([[r] for r in rows], packed, BACKEND_NAME, note)
        else:
            raise ValueError(f"modes: expected names from {MODES}, got {mode!r}")

    runs = {}
    for mode, (feature_batches, collator, attn, note) in plans.items():
        start = time.perf_counter()
        collated = [collator(b) for b in feature_batches]
        seconds = time.perf_counter() - start
        runs[mode] = ModeRun(
            name=mode,
            attn_implementation=attn,
            collator_name=type(collator).__name__,
            batches=[_to_device(b, device) for b in collated],
            real_tokens=[sum(len(f["input_ids"]) for f in b) for b in feature_batches],
            computed_tokens=[int(b["input_ids"].numel()) for b in collated],
            examples=sum(len(b) if "seq_lengths" not in b[0] else sum(len(f["seq_lengths"]) for f in b)
                         for b in feature_batches),
            collate_seconds=seconds,
            note=note,
        )
    return runs, max_tokens, notes


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def preset_config(preset: str):
    """The config of a local model directory given as `--preset` (checked, no remote code)."""
    if not Path(preset).is_dir():
        raise ValueError(f"--preset: expected one of {tuple(PRESETS)} or a local model directory, got {preset!r}")
    return load_local_config(preset, trust_remote_code=False)


def _load_weights(preset: str, dtype: torch.dtype):
    """`from_pretrained` of a local directory, no remote code; a refused or broken weights file in one line
    (transformers loads `.bin` files with `torch.load(weights_only=True)`, which refuses pickled code)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(preset, local_files_only=True, dtype=dtype, attn_implementation="sdpa",
                                                    trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - UnpicklingError, OSError, RuntimeError, …: one line, no traceback
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"--load-weights: refused to load the weights in {preset} "
                         f"({type(error).__name__}: {message[:300]})") from None


def build_model(preset: str, vocab_size: int, dtype: torch.dtype, device: torch.device, *,
                load_weights: bool = False, seed: int = 0):
    """A causal LM from a preset name or a local model directory (config only unless `load_weights`),
    prepared (`packcollate.prepare`: each mode switches its backend with `use_backend`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if preset in PRESETS:
        if load_weights:
            raise ValueError(f"--load-weights: expected a local model directory, got the preset {preset!r}")
        params = dict(PRESETS[preset])
        params["vocab_size"] = max(params["vocab_size"], vocab_size)
        config = LlamaConfig(**params, use_cache=False)
    elif Path(preset).is_dir():
        config = preset_config(preset)
        if load_weights:
            return prepare(_load_weights(preset, dtype).to(device))
        if getattr(config, "vocab_size", vocab_size) < vocab_size:
            raise ValueError(f"--preset {preset}: its vocabulary ({config.vocab_size}) is smaller than the "
                             f"data's tokenizer ({vocab_size})")
    else:
        raise ValueError(f"--preset: expected one of {tuple(PRESETS)} or a local model directory, got {preset!r}")
    check_fits(preset, config, dtype, device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype, trust_remote_code=False)
    return prepare(model)


def _parameters_on_meta(config) -> int:
    """Parameters of the model `config` builds, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return sum(p.numel() for p in model.parameters())


def estimated_parameters(config) -> int | None:
    """Parameters of the model `config` builds, without building it: counted on the meta device with one and
    two layers and extrapolated to `num_hidden_layers` (a config may declare 10**9 layers); None when the
    config does not build that way."""
    layers = getattr(config, "num_hidden_layers", None)
    try:
        if not is_int(layers) or layers <= 2:
            return _parameters_on_meta(config)
        one, two = copy.deepcopy(config), copy.deepcopy(config)
        one.num_hidden_layers, two.num_hidden_layers = 1, 2
        first, second = _parameters_on_meta(one), _parameters_on_meta(two)
    except Exception:  # noqa: BLE001 - no estimate: the real build reports its own error
        return None
    return first + (layers - 1) * (second - first)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new model on `device` (CUDA: `mem_get_info`; CPU on Linux: `MemAvailable`), or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts the page cache the kernel would give back; free pages alone undercount
        with open("/proc/meminfo") as info:
            return next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_fits(preset: str, config, dtype: torch.dtype, device: torch.device) -> None:
    """InputError in one line, before anything is allocated, when the model's weights, gradients and AdamW
    state (4 copies of the parameters, a lower bound: activations come on top) exceed the free memory."""
    parameters, free = estimated_parameters(config), available_memory(device)
    if parameters is None or free is None:
        return
    need = 4 * parameters * torch.finfo(dtype).bits // 8
    if need > free:
        raise InputError(
            f"--preset {preset}: expected a model whose training state fits this machine, got {parameters:,} "
            f"parameters: weights, gradients and AdamW state need {need / 2**30:,.1f} GiB in "
            f"{str(dtype).replace('torch.', '')}, {free / 2**30:,.1f} GiB is free on {device}"
        )
