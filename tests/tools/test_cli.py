"""The `packcollate` command (`packcollate.tools.cli`): `check`'s exit status follows the chosen backend (text and
image-text-to-text), and no command ever prints a traceback for user input: every malformed input exits 2 with
one line that names the file, the line and the key.

The table runs through the console script's own entry point (`console_main`, what the installed
`packcollate` script calls) in a child process per input: one subprocess imports packcollate once and
forks a child for each row (a fresh interpreter per row would cost ~5-15 s of imports each); two rows
also run through the installed console script itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from packcollate.compat import CONTAMINATED
from packcollate.tools import cli
from tests.helpers import own_lines

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_exit_status_follows_the_chosen_backend(capsys):
    assert cli.main(["check", "llama"]) == 0  # packcollate: exact
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert cli.main(["check", "llama", "--backend", "sdpa", "--json"]) == 1  # contaminated with a cache
    printed = json.loads(capsys.readouterr().out)
    assert printed["backends"][0]["verdict"] == CONTAMINATED
    assert cli.main(["check", "llama", "--backend", "packcollate", "--max-seq-length", "100000"]) == 1
    assert "exceeds config.max_position_embeddings" in capsys.readouterr().out
    assert cli.main(["check"]) == 2


def test_check_cli_image_text_to_text(capsys):
    from packcollate.tools.cli import main

    assert main(["check", "--task", "image-text-to-text", "qwen2_vl", "--backend", "packcollate"]) == 0
    out = capsys.readouterr().out
    assert "packcollate use_cache=False exact" in out and "use_cache=True  exact" in out
    with pytest.raises(ValueError, match="expected one of"):
        main(["check", "--task", "image-text-to-text", "llama"])


def test_check_reads_the_task_from_the_config(capsys):
    """`packcollate check qwen2_vl` (no --task): a vision-language family without a causal-LM class is checked as
    the VLM it is, not refused for having no causal-LM head; Gemma 3 (both classes) stays a text check."""
    from packcollate.tools.check import detected_task

    assert cli.main(["check", "qwen2_vl", "--backend", "packcollate"]) == 0
    out = capsys.readouterr().out
    assert "qwen2_vl is a vision-language family: checked as --task image-text-to-text" in out
    assert "packcollate use_cache=False exact" in out
    assert (detected_task("gemma3"), detected_task("llama"), detected_task("llava")) == (
        "text-generation", "text-generation", "image-text-to-text")


# ---------------------------------------------------------------------------------------------
# User input: one line, exit 2
# ---------------------------------------------------------------------------------------------


#: one forked child per case: argv -> (exit status, stderr)
FORK_RUNNER = r'''
import json, os, sys, tempfile, traceback
from packcollate.tools.cli import console_main

results = []
for argv in json.loads(sys.argv[1]):
    err = tempfile.TemporaryFile()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(err.fileno(), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = ["packcollate", *argv]
        try:
            code = console_main()
        except SystemExit as exit:  # as the interpreter does for the console script
            code = exit.code if isinstance(exit.code, int) else (print(exit.code, file=sys.stderr) or 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    err.seek(0)
    results.append([os.waitstatus_to_exitcode(status), err.read().decode(errors="replace")])
print(json.dumps(results))
'''
LLAMA = {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
         "intermediate_size": 32, "vocab_size": 64}


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def bad_inputs(root: Path) -> list[tuple[str, list[str], list[str]]]:
    """(case, argv, substrings the one error line must contain)."""
    ok = _write(root / "ok.jsonl", '{"length": 3}\n')
    files = {
        "array_row": '{"length": 3}\n[1, 2]\n',
        "numeric_ids": '{"input_ids": [1, 2]}\n{"input_ids": 5}\n',
        "null_ids": '{"input_ids": null}\n',
        "null_length": '{"length": 2}\n\n{"length": null}\n',
        "number_row": "3\n",
        "list_row": "[[1, 2]]\n",
        "missing_key": '{"input_ids": [1]}\n{"text": "a"}\n',
        "string_ids": '{"input_ids": "hello world"}\n',
        "nested_ids": '{"input_ids": [[1, 2, 3], [4, 5]]}\n',
        "dict_ids": '{"input_ids": {"a": 1, "b": 2}}\n',
        "negative_length": '{"length": -5}\n',
        "float_length": '{"length": 2.7}\n',
        "bad_json": '{"length": 3\n',
        "empty": "",
    }
    paths = {name: _write(root / f"{name}.jsonl", text) for name, text in files.items()}
    utf8 = _write(root / "utf8.jsonl", b'{"length": 3}\n{"length": "\xff"}\n')
    parquet = _write(root / "garbage.parquet", b"this is not parquet")
    fake = _write(root / "fake_saved" / "dataset_info.json", "{}").parent
    garbage_config = _write(root / "garbage_config" / "config.json", '{"model_type": "llama",\n  oops}').parent
    zero_heads = _write(root / "zero_heads" / "config.json", json.dumps({**LLAMA, "num_attention_heads": 0}, indent=1)).parent
    big_hidden = _write(root / "big_hidden" / "config.json", json.dumps({**LLAMA, "hidden_size": "big"}, indent=1)).parent
    no_context = _write(root / "no_context" / "config.json",
                        json.dumps({**LLAMA, "max_position_embeddings": 0}, indent=1)).parent
    negative_context = _write(root / "negative_context" / "config.json",
                              json.dumps({**LLAMA, "max_position_embeddings": -5}, indent=1)).parent
    uneven_heads = _write(root / "uneven_heads" / "config.json",
                          json.dumps({**LLAMA, "num_attention_heads": 4, "num_key_value_heads": 3}, indent=1)).parent
    huge_vocab = _write(root / "huge_vocab" / "config.json", json.dumps({**LLAMA, "vocab_size": 10**12}, indent=1)).parent
    cases = [
        ("json array row", ["stats", str(paths["array_row"])], ["array_row.jsonl", "line 2", "JSON array"]),
        ("numeric input_ids", ["stats", str(paths["numeric_ids"])], ["numeric_ids.jsonl", "line 2", "'input_ids'"]),
        ("null input_ids", ["stats", str(paths["null_ids"])], ["null_ids.jsonl", "line 1", "'input_ids'"]),
        ("null length", ["stats", str(paths["null_length"])], ["null_length.jsonl", "line 3", "'length'"]),
        ("number row", ["stats", str(paths["number_row"])], ["number_row.jsonl", "line 1", "JSON number"]),
        ("list row", ["stats", str(paths["list_row"])], ["list_row.jsonl", "line 1", "JSON array"]),
        ("missing key", ["stats", str(paths["missing_key"])], ["missing_key.jsonl", "line 2", "'input_ids'"]),
        ("string ids", ["stats", str(paths["string_ids"])], ["string_ids.jsonl", "line 1", "'input_ids'"]),
        ("nested ids", ["stats", str(paths["nested_ids"])], ["nested_ids.jsonl", "line 1", "'input_ids'"]),
        ("dict ids", ["stats", str(paths["dict_ids"])], ["dict_ids.jsonl", "line 1", "'input_ids'"]),
        ("negative length", ["stats", str(paths["negative_length"])], ["negative_length.jsonl", "line 1", "'length'"]),
        ("float length", ["stats", str(paths["float_length"])], ["float_length.jsonl", "line 1", "'length'"]),
        ("invalid json", ["stats", str(paths["bad_json"])], ["bad_json.jsonl", "line 1"]),
        ("invalid utf-8", ["stats", str(utf8)], ["utf8.jsonl", "line 2", "UTF-8"]),
        ("garbage parquet", ["stats", str(parquet)], ["garbage.parquet", "Parquet"]),
        ("fake save_to_disk", ["stats", str(fake)], ["fake_saved", "save_to_disk"]),
        ("empty file", ["stats", str(paths["empty"])], ["empty.jsonl", "expected examples"]),
        ("unknown split", ["stats", str(ok), "--split", "nope"], ["--split", "nope"]),
        ("negative max-seq-length", ["stats", str(ok), "--max-seq-length", "-5"], ["--max-seq-length", "-5"]),
        ("zero batch size", ["stats", str(ok), "--batch-size", "0"], ["--batch-size", "0"]),
        ("garbage config (stats)", ["stats", str(ok), "--model", str(garbage_config)], ["config.json", "line 2"]),
        ("garbage config (check)", ["check", str(garbage_config)], ["garbage_config/config.json", "line 2"]),
        ("zero heads (check)", ["check", str(zero_heads)], ["zero_heads/config.json", "line", "'num_attention_heads'"]),
        ("string hidden size (check)", ["check", str(big_hidden)], ["big_hidden/config.json", "line", "'hidden_size'"]),
        ("garbage config (bench)", ["bench", "--preset", str(garbage_config)], ["garbage_config/config.json", "line 2"]),
        ("zero heads (bench)", ["bench", "--preset", str(zero_heads)], ["zero_heads/config.json", "'num_attention_heads'"]),
        ("string hidden size (bench)", ["bench", "--preset", str(big_hidden)], ["big_hidden/config.json", "'hidden_size'"]),
        # a config no consistent model is built from: never "exact" about another architecture
        ("context length 0 (check)", ["check", str(no_context)],
         ["no_context/config.json", "line 8", "'max_position_embeddings'", "got 0"]),
        ("negative context length (check)", ["check", str(negative_context)],
         ["negative_context/config.json", "line 8", "'max_position_embeddings'", "got -5"]),
        ("heads not divisible by kv heads (check)", ["check", str(uneven_heads)],
         ["uneven_heads/config.json", "line 8", "'num_key_value_heads'", "num_attention_heads=4", "got 3"]),
        ("heads not divisible by kv heads (bench)", ["bench", "--preset", str(uneven_heads)],
         ["uneven_heads/config.json", "'num_key_value_heads'"]),
        ("vocabulary of 10**12 (bench)", ["bench", "--preset", str(huge_vocab), "--steps", "1"],
         ["--preset", "huge_vocab", "32,000,000,002,608 parameters", "GiB"]),
        ("device quantum (check)", ["check", "llama", "--device", "quantum"], ["device", "'quantum'"]),
        ("device tpu (check)", ["check", "llama", "--device", "tpu"], ["device", "'tpu'"]),
        ("device tpu (bench)", ["bench", "--device", "tpu"], ["device", "'tpu'"]),
        ("negative max-seq-length (check)", ["check", "llama", "--max-seq-length", "-5"], ["--max-seq-length", "-5"]),
        ("zero steps (bench)", ["bench", "--steps", "0"], ["--steps", "got 0"]),
        ("negative steps (bench)", ["bench", "--steps", "-3"], ["--steps", "got -3"]),
        ("zero batch size (bench)", ["bench", "--batch-size", "0"], ["--batch-size", "got 0"]),
    ]
    return cases


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


def _assert_one_line_error(case: str, code: int, stderr: str, expected: list[str]) -> None:
    lines = own_lines(stderr)
    assert "Traceback" not in stderr, f"{case}: {stderr}"
    assert code == 2, f"{case}: exit {code}: {stderr}"
    assert len(lines) == 1, f"{case}: {stderr}"
    assert lines[0].startswith("packcollate ") and ": error: " in lines[0], f"{case}: {lines[0]}"
    for text in expected:
        assert text in lines[0], f"{case}: {text!r} not in {lines[0]!r}"


def test_every_malformed_input_exits_2_with_one_line(tmp_path):
    cases = bad_inputs(tmp_path)
    result = subprocess.run([sys.executable, "-c", FORK_RUNNER, json.dumps([argv for _, argv, _ in cases])],
                            capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    failures = []
    for (case, _, expected), (code, stderr) in zip(cases, outcomes, strict=True):
        try:
            _assert_one_line_error(case, code, stderr, expected)
        except AssertionError as error:
            failures.append(str(error).splitlines()[0][:160])
    assert not failures, f"{len(failures)} of {len(cases)} inputs:\n" + "\n".join(failures)


@pytest.mark.parametrize("case", ["json array row", "zero heads (check)"])
def test_the_installed_console_script_prints_one_line(tmp_path, case):
    script = shutil.which("packcollate")
    if script is None:
        pytest.skip("no packcollate console script on PATH")
    _, argv, expected = next(c for c in bad_inputs(tmp_path) if c[0] == case)
    result = subprocess.run([script, *argv], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    _assert_one_line_error(case, result.returncode, result.stderr, expected)


def test_check_bert_says_is_decoder_false_is_bidirectional(capsys):
    from packcollate.tools.cli import console_main

    assert console_main(["check", "bert", "--backend", "packcollate"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "causality" in line)
    assert "warning" in line and "bidirectional" in line and "is_decoder=False" in line
    assert "exact" in out  # the proof still holds: bidirectional within each example


def test_console_script_prints_input_errors_on_one_line(tmp_path, capsys):
    from packcollate.tools.cli import console_main

    assert console_main(["stats", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("packcollate stats: error: DATA:") and "no such path" in err and "Traceback" not in err
