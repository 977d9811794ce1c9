"""Security: remote code runs only with `--trust-remote-code`, and a pickled weights file is refused
in one line.

transformers asks `[y/N]` on a terminal when a folder names custom code and `trust_remote_code` is
not passed; these tests run the console script on a pseudo-terminal, answer `y`, and check that the
folder's code did not run (it would write a marker file on import).
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_output import own_lines

from packcollate.tools.toy import char_tokenizer

EVIL_MODULE = '''
import os, pathlib
pathlib.Path(os.environ["PACKCOLLATE_MARKER"]).write_text("remote code ran")
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from transformers import LlamaConfig


class EvilTokenizer(TokenizersBackend):
    pass


class EvilConfig(LlamaConfig):
    model_type = "evil"
'''


def _console_script() -> list[str]:
    script = shutil.which("packcollate")
    return [script] if script else [sys.executable, "-m", "packcollate.tools.cli"]


def _env(marker: Path) -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PACKCOLLATE_MARKER": str(marker), "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def run_on_pty(args: list[str], marker: Path, answer: bytes = b"y\n", timeout: float = 120) -> tuple[int, str]:
    """Run the console script with a pseudo-terminal as stdin/stdout/stderr, answering every prompt."""
    master, slave = pty.openpty()
    process = subprocess.Popen(_console_script() + args, stdin=slave, stdout=slave, stderr=slave, env=_env(marker),
                               close_fds=True)
    os.close(slave)
    output, deadline, answered = b"", time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if output.count(b"[y/N]") > answered:
                answered += 1
                os.write(master, answer)
        elif process.poll() is not None:
            break
    process.wait(timeout=10)
    os.close(master)
    return process.returncode, output.decode(errors="replace")


@pytest.fixture
def evil_tokenizer(tmp_path) -> Path:
    folder = tmp_path / "evil_tokenizer"
    char_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_MODULE)
    return folder


@pytest.fixture
def evil_model(tmp_path) -> Path:
    folder = tmp_path / "evil_model"
    folder.mkdir()
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}, "hidden_size": 16,
              "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 32, "vocab_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_MODULE)
    return folder


@pytest.fixture
def text_data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(4)))
    return path


def test_stats_tokenizer_never_runs_a_folders_code_on_a_terminal(tmp_path, evil_tokenizer, text_data):
    marker = tmp_path / "marker"
    code, output = run_on_pty(["stats", str(text_data), "--tokenizer", str(evil_tokenizer)], marker)
    assert not marker.exists(), output
    assert "[y/N]" not in output  # the flag is passed explicitly: transformers never asks
    assert code == 2 and "Traceback" not in output, output


def test_stats_forwards_trust_remote_code_to_the_tokenizer(tmp_path, evil_tokenizer, text_data):
    marker = tmp_path / "marker"
    code, output = run_on_pty(["stats", str(text_data), "--tokenizer", str(evil_tokenizer), "--trust-remote-code"],
                              marker, answer=b"n\n")
    assert marker.exists(), output  # asked for: the folder's tokenizer code runs
    assert "[y/N]" not in output


def test_bench_preset_never_runs_a_folders_code_on_a_terminal(tmp_path, evil_model):
    marker = tmp_path / "marker"
    code, output = run_on_pty(["bench", "--preset", str(evil_model), "--steps", "1", "--batch-size", "1",
                               "--modes", "padded", "--no-plot", "--out", str(tmp_path / "out")], marker)
    assert not marker.exists(), output
    assert "[y/N]" not in output
    assert code == 2 and "Traceback" not in output, output


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PACKCOLLATE_TEST_MARKER']}",))


def test_bench_load_weights_refuses_a_malicious_pickle_in_one_line(tmp_path, monkeypatch):
    """`torch.load(weights_only=True)` refuses the file (nothing runs); the command says so in one line."""
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
              "num_hidden_layers": 1, "intermediate_size": 32, "vocab_size": 128, "architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pickle_ran"
    monkeypatch.setenv("PACKCOLLATE_TEST_MARKER", str(marker))
    torch.save({"model.embed_tokens.weight": _RunsCode()}, folder / "pytorch_model.bin")
    result = subprocess.run(
        _console_script() + ["bench", "--preset", str(folder), "--load-weights", "--dataset", "arithmetic",
                             "--steps", "1", "--batch-size", "1", "--modes", "padded", "--no-plot",
                             "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=_env(tmp_path / "unused"), timeout=300,
    )
    assert not marker.exists()
    assert result.returncode == 2, result.stderr
    lines = own_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("packcollate bench: error: --load-weights: refused") and str(folder) in lines[0]
