"""Load a model config from a local folder for the command line, refusing a malformed one in one line.

`packcollate check DIR`, `bench --preset DIR` and `stats --model DIR` read a user's `config.json`.
transformers reports a broken file, a zero head count or a string size as a traceback from deep
inside a model constructor (`ZeroDivisionError`, a dataclass validation error); `load_local_config`
reads the JSON first and raises a ValueError naming the file, the line and the key. Remote code
never runs unless `trust_remote_code=True` is passed: the flag always goes to transformers
explicitly, so no `[y/N]` prompt can appear on a terminal.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from ..errors import InputError, is_int

#: Sizes a model is built from: when present (and not null) each must be a positive int.
SIZE_KEYS = (
    "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
    "num_key_value_heads", "head_dim", "n_embd", "n_head", "n_layer", "d_model", "num_heads", "num_layers",
)
#: Context lengths: when present (and not null) each must be a positive int (0 or less would make every
#: example "too long", or a position table of no rows).
POSITIVE_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")
#: (query heads, key/value heads): the query heads must be a multiple of the key/value heads (GQA groups).
HEAD_PAIRS = (("num_attention_heads", "num_key_value_heads"), ("n_head", "n_head_kv"), ("num_heads", "num_kv_heads"))
#: Sub-configs of composite configs, checked the same way.
SUB_CONFIG_KEYS = ("text_config", "decoder", "language_config", "llm_config")


def config_file(path) -> Path | None:
    """The `config.json` of a folder (or the file itself), or None when `path` is neither."""
    path = Path(path)
    if path.is_dir():
        return path / "config.json" if (path / "config.json").is_file() else None
    return path if path.is_file() and path.suffix == ".json" else None


def _line_of(text: str, key: str) -> int:
    """The line of `"key"` in the JSON text (1 when not found)."""
    at = text.find(f'"{key}"')
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


def check_config_json(file: Path) -> dict:
    """Parse `file` and check its `SIZE_KEYS`; return the dict. Raises ValueError naming file, line and key."""
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{file}: expected UTF-8 JSON, got an invalid byte at offset {error.start}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{file}: line {error.lineno}: expected a JSON object, got invalid JSON ({error.msg})") from None
    if not isinstance(values, dict):
        raise InputError(f"{file}: line 1: expected a JSON object, got a {type(values).__name__}")
    sections = [("", values)] + [(f"{k}.", values[k]) for k in SUB_CONFIG_KEYS if isinstance(values.get(k), dict)]
    for prefix, section in sections:
        for key in SIZE_KEYS:
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, list) and value and all((is_int(v) and v > 0) for v in value):
                continue  # per-layer sizes
            if not (is_int(value) and value > 0):
                raise InputError(
                    f"{file}: line {_line_of(text, key)}: key {prefix + key!r}: expected a positive int, got {value!r}"
                )
        problem = config_values_problem(section)
        if problem is not None:
            key, message = problem
            raise InputError(f"{file}: line {_line_of(text, key)}: key {prefix + key!r}: {message}")
    return values


def _default_value(model_type, key):
    """`key` of transformers' default config for `model_type` (None when there is none): a value the
    architecture itself ships, such as XLNet's `max_position_embeddings=-1` (relative positions, no limit)."""
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.for_model(model_type), key, None)
    except Exception:  # noqa: BLE001 - unknown or remote model type: no default to compare with
        return None


def config_values_problem(values, model_type=None) -> tuple[str, str] | None:
    """`(key, "expected …, got …")` for the first value of a config (a mapping) no model can be built from
    consistently: a context length of 0 or less (unless the architecture's own default is that value),
    query heads that are not a multiple of the key/value heads. None when there is none. (Sizes that are
    not positive ints: `SIZE_KEYS`, checked by `check_config_json`.)"""
    model_type = model_type or values.get("model_type")
    for key in POSITIVE_CONTEXT_KEYS:
        value = values.get(key)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and value <= 0:
            if value != _default_value(model_type, key):
                return key, f"expected a positive int (the model's context length), got {value!r}"
    for heads_key, kv_key in HEAD_PAIRS:
        heads, kv_heads = values.get(heads_key), values.get(kv_key)
        if is_int(heads) and is_int(kv_heads) and kv_heads > 0 and heads % kv_heads:
            return kv_key, (f"expected a divisor of {heads_key}={heads} (every key/value head serves a whole group of "
                            f"query heads), got {kv_heads}")
    return None


def _attribute(config, key):
    """`getattr(config, key, None)`, None too where a config refuses the attribute (per-layer sizes)."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - e.g. "a per-layer attribute ... access it via the layer configs"
        return None


def check_config_values(config) -> None:
    """Raise InputError for a config object (and its text sub-config) that `config_values_problem` refuses:
    a tiny copy of it would not be the architecture asked about, so no verdict could be true."""
    configs = [config]
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else None
    except Exception:  # noqa: BLE001 - several text configs (MusicGen): the top level is checked
        text = None
    if text is not None and text is not config:
        configs.append(text)
    keys = (*POSITIVE_CONTEXT_KEYS, *(k for pair in HEAD_PAIRS for k in pair))
    for part in configs:
        problem = config_values_problem({key: _attribute(part, key) for key in keys}, part.model_type)
        if problem is not None:
            key, message = problem
            raise InputError(f"{type(part).__name__}: {key}: {message}")


def read_config_json(path) -> dict:
    """The JSON object of a `config.json` (a file, or a folder holding one), read and checked as data:
    no code runs, so this works for configs that name remote code (`auto_map`) without trusting it."""
    file = config_file(path)
    if file is None:
        raise FileNotFoundError(f"expected a config.json file or a folder holding one, got {str(path)!r}")
    return check_config_json(file)


def load_local_config(path, *, trust_remote_code: bool = False):
    """A transformers config from a local folder or `config.json` (no network), checked first.

    Raises ValueError naming the file (and line and key) for a malformed config, and for one that
    transformers refuses.
    """
    from transformers import AutoConfig

    file = config_file(path)
    if file is None:
        raise InputError(f"{path}: expected a folder with a config.json, or a config.json file")
    check_config_json(file)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=bool(trust_remote_code))
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds for a bad file: one line
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputError(f"{file}: expected a config transformers can load, got {type(error).__name__}: {message}") from None


#: Config attributes that hold a model's context length, in the order they are read
#: (`seq_length` is ChatGLM's name, `n_positions` / `n_ctx` GPT-2's).
CONTEXT_KEYS = ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length", "max_seq_len", "n_ctx")


def _first_context_key(configs) -> tuple[int | None, str | None]:
    """The first positive int under `CONTEXT_KEYS` in `configs` (mappings), in order."""
    for cfg in configs:
        for key in CONTEXT_KEYS:
            value = cfg.get(key)
            if is_int(value) and value > 0:
                return value, key
    return None, None


def context_length(config) -> tuple[int | None, str | None]:
    """The model's context length and the config attribute it came from, or `(None, None)`.

    Reads `CONTEXT_KEYS` on the config, then on its text sub-config (multimodal configs).
    With padding-free batches, each example (not the packed row) must fit in it.
    """
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    return _first_context_key([{key: getattr(cfg, key, None) for key in CONTEXT_KEYS} for cfg in configs])


def context_length_from_json(data: dict) -> tuple[int | None, str | None]:
    """`context_length` of a config.json's data (`read_config_json`), its `text_config`
    too, as plain values."""
    text = data.get("text_config")
    return _first_context_key([data, *([text] if isinstance(text, dict) else [])])
