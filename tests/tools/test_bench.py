"""`packcollate bench` (`packcollate.tools.bench`): fast CPU runs on a micro model, a few steps each.

The numbers are not checked (they are noise at this size); the result's schema, the files it
writes, the loss agreement between modes and the data paths are. A preset folder's remote code never
runs on a terminal without `--trust-remote-code`, and a pickled weights file is refused in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from packcollate.tools import bench as benchmark
from packcollate.tools import cli
from packcollate.tools.bench import (
    MODES,
    length_grouped_batches,
    run_benchmark,
    tokenize_rows,
)
from packcollate.tools.toy import arithmetic_problems, char_tokenizer
from tests.helpers import (
    EVIL_MODULE,
    console_env,
    console_script,
    own_lines,
    run_on_pty,
)

try:
    import datasets  # noqa: F401
    import trl  # noqa: F401

    HAS_TRL = True
except ImportError:
    HAS_TRL = False

try:
    import matplotlib  # noqa: F401

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False


QUICK = dict(steps=2, batch_size=4, warmup=1, repeats=1, quiet=True)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return run_benchmark("micro", "flan", out=out, **QUICK), out


def test_result_schema(micro_run):
    result, _ = micro_run
    assert isinstance(result["device"], str) and result["device"].startswith("cpu-")
    assert result["preset"] == "micro" and result["dataset"] == "flan"
    assert result["command"].startswith("packcollate bench") and "--preset micro" in result["command"]
    assert result["ideal_speedup"] >= 1.0
    expected = [m for m in MODES if m != "trl-bfd" or HAS_TRL]
    assert list(result["modes"]) == expected
    for name, mode in result["modes"].items():
        assert isinstance(mode["tokens_per_s"], float) and mode["tokens_per_s"] > 0, name
        assert isinstance(mode["speedup_vs_padded"], float)
        if benchmark.fork_memory_available():
            assert isinstance(mode["peak_mem_bytes"], int) and mode["peak_mem_bytes"] > 0, name
            assert isinstance(mode["mem_vs_padded"], float)
        assert 0.0 <= mode["padded_fraction"] < 1.0
        assert mode["first_losses"], name
    assert result["modes"]["padded"]["speedup_vs_padded"] == 1.0
    for name in ("hf-flatten", "packcollate", "packcollate-budget"):
        assert result["modes"][name]["padded_fraction"] == 0.0
    # every mode trains on every example of the epoch exactly once per pass
    assert {m["real_tokens"] for m in result["modes"].values()} == {result["data"]["tokens"]}
    assert {m["examples"] for m in result["modes"].values()} == {result["data"]["examples"]}


def test_json_written(micro_run):
    result, out = micro_run
    path = Path(result["json"])
    assert path.parent == out and path.name == "train_throughput_micro_flan.json"
    written = json.loads(path.read_text())
    for key in ("device", "preset", "dataset", "command", "ideal_speedup", "modes"):
        assert written[key] == result[key]
    for mode in written["modes"].values():
        assert {"tokens_per_s", "peak_mem_bytes", "speedup_vs_padded", "mem_vs_padded"} <= set(mode)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_plot_written(micro_run):
    result, out = micro_run
    png = Path(result["plot"])
    assert png == out / "train_throughput_micro_flan.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_losses_agree_across_modes(micro_run):
    result, _ = micro_run
    checks = result["loss_check"]
    assert checks["passed"]
    assert checks["first_step"]["modes"] == ["padded", "hf-flatten", "packcollate"]
    assert checks["first_step"]["max_difference"] <= 1e-4
    epoch = checks["epoch"]
    assert set(epoch["losses"]) == set(result["modes"]) and epoch["max_difference"] <= 1e-4


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--preset", "--dataset", "--tokenizer", "--modes", "--max-tokens", "--memory"):
        assert option in text


def test_cli_run(tmp_path):
    status = cli.main(["bench", "--preset", "micro", "--dataset", "uniform", "--steps", "2", "--batch-size", "3",
                       "--warmup", "0", "--repeats", "1", "--modes", "padded,packcollate", "--memory", "off",
                       "--no-plot", "--out", str(tmp_path)])
    assert status == 0
    result = json.loads((tmp_path / "train_throughput_micro_uniform.json").read_text())
    assert list(result["modes"]) == ["padded", "packcollate"]
    assert result["modes"]["packcollate"]["peak_mem_bytes"] is None
    assert not list(tmp_path.glob("*.png"))


def test_user_jsonl_with_tokenizer(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    char_tokenizer().save_pretrained(tokenizer_dir)
    data = tmp_path / "problems.jsonl"
    with open(data, "w") as f:
        for row in arithmetic_problems(12, seed=1):
            f.write(json.dumps(row) + "\n")
    result = run_benchmark("micro", str(data), tokenizer=str(tokenizer_dir),
                           modes=["padded", "hf-flatten", "packcollate", "packcollate-budget"],
                           memory="off", plot=False, out=tmp_path / "out", **{**QUICK, "batch_size": 3})
    assert result["data"]["completion_only"]
    assert result["loss_check"]["passed"], result["loss_check"]
    assert Path(result["json"]).name == "train_throughput_micro_problems.json"


def test_truncation_that_leaves_nothing_to_predict_is_a_clear_error(tmp_path):
    """--max-length shorter than every prompt: each mode's loss would be NaN; refuse, naming the row."""
    tokenizer_dir = tmp_path / "tokenizer"
    char_tokenizer().save_pretrained(tokenizer_dir)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_problems(4, seed=1)))
    with pytest.raises(ValueError, match=r"row \d+ keeps no trained token after --max-length 10"):
        benchmark.load_data(str(data), 4, vocab_size=512, tokenizer=str(tokenizer_dir), max_length=10)
    with pytest.raises(ValueError, match=r"--dataset arithmetic: row \d+ keeps no trained token after --max-length 10"):
        benchmark.load_data("arithmetic", 4, vocab_size=512, max_length=10)


def test_tokenize_rows_formats():
    tokenizer = char_tokenizer()
    text = tokenize_rows([{"text": "abc"}], tokenizer)
    assert text == [{"input_ids": tokenizer("abc")["input_ids"]}]
    prompt = tokenize_rows([{"prompt": "1+1=", "completion": "2"}], tokenizer)[0]
    assert prompt["labels"][:4] == [-100] * 4 and prompt["labels"][4:] == prompt["input_ids"][4:]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat = tokenize_rows([{"messages": messages}], tokenizer)[0]
    trained = [t for t, label in zip(chat["input_ids"], chat["labels"]) if label != -100]
    assert tokenizer.decode(trained).startswith("yo")
    with pytest.raises(KeyError, match="expected rows with"):
        tokenize_rows([{"question": "?"}], tokenizer)


def test_length_grouped_batches_keep_every_example():
    lengths = np.random.default_rng(0).integers(1, 500, 101)
    batches = length_grouped_batches(lengths, 8)
    assert sorted(i for b in batches for i in b) == list(range(101))
    assert max(lengths[batches[0]]) == lengths.max()


def test_schedule_interleaves_modes_evenly():
    runs = {name: benchmark.ModeRun(name, "sdpa", "x", [{}] * n, [1] * n, [1] * n, n, 0.0)
            for name, n in (("a", 6), ("b", 3))}
    order = benchmark.measure._schedule(runs, repeats=2)
    assert [name for name, _ in order].count("a") == 12 and [name for name, _ in order].count("b") == 6
    first_half = [name for name, _ in order[:9]]
    assert first_half.count("b") == 3  # b is not left to the end


@pytest.mark.parametrize("budget, met", [(3.6, True), (3.5, False)])
def test_budget_target_is_packcollates_own_speed(budget, met):
    """CPU tiny flan: packcollate >= 2.5x padded, and packcollate-budget at least as fast as packcollate."""
    from packcollate.tools.bench.report import check_targets

    result = {"preset": "tiny", "dataset": "flan", "modes": {
        "packcollate": {"speedup_vs_padded": 3.56, "mem_vs_padded": 0.3},
        "packcollate-budget": {"speedup_vs_padded": budget, "mem_vs_padded": 0.2},
    }}
    found = {t["mode"]: t for t in check_targets(result, "cpu")}
    assert found["packcollate"]["met"]
    assert found["packcollate-budget"]["met"] is met
    assert "(packcollate)" in found["packcollate-budget"]["what"]


# ---------------------------------------------------------------------------------------------
# Security: remote code and pickled weights
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def evil_model(tmp_path) -> Path:
    folder = tmp_path / "evil_model"
    folder.mkdir()
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}, "hidden_size": 16,
              "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 32, "vocab_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_MODULE)
    return folder


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
        console_script() + ["bench", "--preset", str(folder), "--load-weights", "--dataset", "arithmetic",
                             "--steps", "1", "--batch-size", "1", "--modes", "padded", "--no-plot",
                             "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=console_env(tmp_path / "unused"), timeout=300,
    )
    assert not marker.exists()
    assert result.returncode == 2, result.stderr
    lines = own_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("packcollate bench: error: --load-weights: refused") and str(folder) in lines[0]
