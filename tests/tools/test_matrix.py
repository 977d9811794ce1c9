"""The compatibility matrix (`packcollate.tools.matrix`): `check_all` runs every architecture in an isolated worker
process, so a segfault or a hang becomes that architecture's error, the others still get their verdicts, and
the table and JSON are written."""

import json
import os
import signal
import time

import pytest

from packcollate.compat import EXACT
from packcollate.tools.matrix import check_all, check_architecture

pytestmark = pytest.mark.usefixtures("one_thread")


def breaking_check(model_type, backends, device):
    """A check that segfaults or hangs on purpose (runs in a worker process)."""
    if model_type == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if model_type == "hang":
        time.sleep(600)
    return check_architecture(model_type, backends, device)


def test_check_all_isolates_crashes_and_hangs(tmp_path):
    document = check_all(
        ["hang", "segfault", "llama", "gpt2"], backends=["sdpa", "packcollate"], jobs=2, timeout=15,
        out=tmp_path, check=breaking_check, progress=False, command="test",
    )
    entries = {e["model_type"]: e for e in document["architectures"]}
    assert "killed by SIGSEGV" in entries["segfault"]["error"]
    assert entries["hang"]["error"] == "timed out after 15 s"
    assert entries["llama"]["backends"] and entries["gpt2"]["backends"]
    assert document["summary"]["with_verdict"] == 2
    assert document["summary"]["counts"]["packcollate use_cache=False"] == {EXACT: 2}
    markdown = (tmp_path / "compatibility.md").read_text()
    assert "| `llama` LlamaForCausalLM | exact | exact |" in markdown
    assert "coverage: 2 of 4 architectures" in markdown and "timed out after 15 s" in markdown
    assert json.loads((tmp_path / "compatibility.json").read_text())["command"] == "test"
