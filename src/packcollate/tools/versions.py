"""Library versions recorded with results: the compatibility matrices (`packcollate check --all`) and
the benchmarks (`packcollate bench`, `benchmarks/*.py`)."""

from __future__ import annotations

import importlib
import platform


def module_versions(*names: str) -> dict[str, str]:
    """`{name: version}` in the order of `names`: `"python"` is the interpreter's version, any other name a
    module's `__version__` (`"packcollate"`: this package's); a module that does not import is left out."""
    found = {}
    for name in names:
        if name == "python":
            found[name] = platform.python_version()
            continue
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return found


def library_versions(*names: str) -> dict[str, str]:
    """`{name: version}` of Python, packcollate and each of `names` that imports (the others are left out)."""
    return module_versions("python", "packcollate", *names)
