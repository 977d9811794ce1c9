"""The errors packcollate raises on purpose, and the argument checks that raise them.

Every refusal is one line naming what was expected and what was given (the example index, the key,
the layer). Each class also subclasses the built-in exception callers already catch, so
`except ValueError` / `except RuntimeError` keeps working; `except PackcollateError` catches them all.

| class | also a | raised when |
| --- | --- | --- |
| `InputError` | `ValueError` | a malformed example, batch, option, file or length |
| `MissingKeyError` | `KeyError` | an example or a batch lacks a key it needs |
| `InputTypeError` | `TypeError` | a value of the wrong kind (not a list of dicts, not a transformers model) |
| `LayoutError` | `ValueError` | a packed layout (`cu_seq_lens_*`, `position_ids`, masks, block ids) that does not describe the batch it came with |
| `UnsupportedError` | `ValueError`, `NotImplementedError` (a `RuntimeError`) | a model, layer or setting whose packed batch cannot be kept exact on this path: refused, never approximated |
| `BackendRefused` | `ValueError`, `NotImplementedError` | a model that keeps its attention backend when asked to switch (it picks it when built) |
| `NotPreparedError` | `RuntimeError` | a packed batch reached a layer that carries state in a model `packcollate.prepare` did not prepare |
| `LaunchError` | `RuntimeError` | a distributed launch that would silently run something else than what was asked (FSDP on CPU, one process of two) |
| `PackingUnsafeError` | `RuntimeError` | the numeric proof measured packed examples mixing (`assert_packing_safe`) |
"""

from __future__ import annotations

import numbers


class PackcollateError(Exception):
    """Base of every error packcollate raises on purpose."""


class InputError(PackcollateError, ValueError):
    """A malformed example, batch, option, file or length."""


class MissingKeyError(InputError, KeyError):
    """An example or a batch lacks a key it needs."""


class InputTypeError(InputError, TypeError):
    """A value of the wrong kind."""


class LayoutError(InputError):
    """A packed layout that does not describe the batch it came with."""


class UnsupportedError(PackcollateError, ValueError, NotImplementedError):
    """A model, layer or setting whose packed batch cannot be kept exact on this path."""


class BackendRefused(UnsupportedError):
    """A model kept its attention backend when asked to switch (it picks its attention when built)."""


class NotPreparedError(PackcollateError, RuntimeError):
    """A packed batch reached a layer that carries state in a model `packcollate.prepare` did not prepare."""


class LaunchError(PackcollateError, RuntimeError):
    """A distributed launch that would silently run something else than what was asked."""


class PackingUnsafeError(PackcollateError, RuntimeError):
    """The numeric proof measured packed examples mixing."""


def is_int(value) -> bool:
    """An integer that is not a bool (Python or numpy)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    """`value` as an int; `InputError` naming `name` unless it is an integer >= 1."""
    if not is_int(value) or value < 1:
        raise InputError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_non_negative_int(name: str, value) -> int:
    """`value` as an int; `InputError` naming `name` unless it is an integer >= 0."""
    if not is_int(value) or value < 0:
        raise InputError(f"{name}: expected a non-negative int, got {value!r}")
    return int(value)


def one_line(error: BaseException, limit: int = 300) -> str:
    """`"TypeName: message"` on one line, cut to `limit` characters (for reports and tables)."""
    text = " ".join(str(error).split()) or repr(error)
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"
