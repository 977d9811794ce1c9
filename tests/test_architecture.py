"""The package's architecture, read from its source: the folders are the layers, and the data path reads
top to bottom.

- each module imports from its own layer or the layers below it, never above (function-local imports
  included), so there is no import cycle between layers;
- no import cycle between modules either, and no module imports a private name (`_name`) from another;
- at most 14 entries at the top of `src/packcollate/`;
- `import packcollate` loads no tools (CLI, demo, stats, matrix, benchmark, toy data) and no integration.
"""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "packcollate"

#: The layers, bottom up; a module may import from its own layer and the ones before it.
LAYERS = [
    ("errors",),
    ("layout", "unwrap"),
    ("collate", "batching"),
    ("backend",),
    ("objectives",),
    ("compat",),
    ("integrations",),
    ("tools",),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, str]]:
    """(module imported from, name imported) of every packcollate import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "packcollate":
                source = node.module
            else:
                continue
            found += [(source, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "packcollate"]
    return found


def layer_of(module: str) -> int | None:
    top = module.split(".")[1] if module.count(".") else None
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def test_layers_import_only_downwards():
    upward = []
    for name, path in modules().items():
        own = layer_of(name)
        if own is None:  # the package's __init__: it may import every layer
            continue
        for source, _ in imports(name, path):
            target = source if source in modules() or source == "packcollate" else source.rpartition(".")[0]
            layer = layer_of(target)
            if layer is not None and layer > own:
                upward.append(f"{name} imports {source} (layer {LAYERS[layer]} above {LAYERS[own]})")
    assert not upward, "\n".join(upward)


def test_no_private_name_crosses_a_module():
    crossing = [f"{name}: from {source} import {imported}" for name, path in modules().items()
                for source, imported in imports(name, path)
                if imported.startswith("_") and source != name]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycle():
    known = modules()
    graph = defaultdict(set)
    for name, path in known.items():
        for source, imported in imports(name, path):
            target = f"{source}.{imported}" if f"{source}.{imported}" in known else source
            if target in known and target != name and not name.startswith(target + "."):  # a package's own __init__
                graph[name].add(target)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(known):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_at_most_14_entries_at_the_top():
    entries = [p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 14, sorted(entries)


def test_import_loads_no_tools_and_no_integration():
    script = ("import sys, packcollate; print(sorted(m for m in sys.modules "
              "if m.startswith(('packcollate.tools', 'packcollate.integrations'))))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]
