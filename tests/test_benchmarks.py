"""The benchmark scripts import, and read only names their sibling modules define.

Benchmarks are run by hand (they time, so no test runs them); a name one of them reads from a sibling it
imports (`recurrent_step.flan_like_batches`, `common.round_robin`) that the sibling no longer defines would only
show when someone runs it. Read statically: each `module.name` on an imported sibling must exist."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path for path in BENCHMARKS.glob("*.py"))


def _sibling_imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> sibling module name, for `import sibling` / `import sibling as name`."""
    siblings = {path.stem for path in SCRIPTS}
    return {alias.asname or alias.name: alias.name for node in tree.body if isinstance(node, ast.Import)
            for alias in node.names if alias.name in siblings}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_a_benchmark_reads_only_what_its_siblings_define(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    tree = ast.parse(script.read_text())
    siblings = _sibling_imports(tree)
    module = importlib.import_module(script.stem)
    assert module is sys.modules[script.stem]
    missing = sorted({f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in siblings
                      and not hasattr(importlib.import_module(siblings[node.value.id]), node.attr)})
    assert not missing, f"{script.name} reads {', '.join(missing)}, which its sibling modules do not define"
