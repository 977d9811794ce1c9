"""`packcollate stats` (`packcollate.tools.stats`): how long the examples of every split are and what packing would
save, read from JSONL, Parquet, `save_to_disk` folders and chats.

It counts only what is a token count: every malformed row or option is refused with the row (file and line)
and the key. A folder's remote code runs only with `--trust-remote-code` (checked on a pseudo-terminal,
where transformers would ask `[y/N]`; the folder's code would write a marker file on import). The length
statistics themselves: batching/test_lengths.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import LlamaConfig

from packcollate.tools.cli import main
from packcollate.tools.toy import (
    arithmetic_problems,
    char_tokenizer,
    tokenize_prompt_completion,
)
from tests.helpers import EVIL_MODULE, run_on_pty


@pytest.fixture
def data_dir(tmp_path):
    problems = arithmetic_problems(60, seed=1)
    tokenized = tokenize_prompt_completion(problems)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"input_ids": t["input_ids"]}) + "\n" for t in tokenized[:40]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems[40:]))
    char_tokenizer().save_pretrained(tmp_path / "tokenizer")
    LlamaConfig(max_position_embeddings=300).save_pretrained(tmp_path / "model")
    return tmp_path


def test_cli_reports_every_split(data_dir, capsys):
    problems = arithmetic_problems(60, seed=1)
    train_lengths = [len(t["input_ids"]) for t in tokenize_prompt_completion(problems[:40])]
    status = main(["stats", str(data_dir / "train.jsonl"), str(data_dir / "validation.jsonl"), "--tokenizer",
                   str(data_dir / "tokenizer"), "--model", str(data_dir / "model"), "--max-seq-length", "200", "--json"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["splits"]) == {"train", "validation", "all splits"}
    assert result["splits"]["train"]["count"] == 40 and result["splits"]["validation"]["count"] == 20
    assert result["context_limit"] == 300
    assert result["splits"]["train"]["max"] == max(train_lengths)
    assert result["splits"]["train"]["over"] == sum(n > 200 for n in train_lengths)
    assert result["recommended_max_seq_length"] == 300  # capped at the model's context
    assert result["over_recommended"]["train"] == sum(n > 300 for n in train_lengths)


def test_cli_table_and_plot(data_dir, capsys):
    plot = data_dir / "lengths.png"
    main(["stats", str(data_dir), "--tokenizer", str(data_dir / "tokenizer"), "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "recommended max_seq_length" in out and "validation" in out and "train" in out
    assert plot.exists() and plot.stat().st_size > 1000


def test_cli_reads_save_to_disk_folders_and_filters_splits(tmp_path, capsys):
    ids = [list(range(n)) for n in (5, 9, 12)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": ids}),
                          "test": datasets.Dataset.from_dict({"input_ids": ids[:1]})}).save_to_disk(tmp_path / "ds")
    main(["stats", str(tmp_path / "ds"), "--split", "train", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert list(result["splits"]) == ["train"] and result["splits"]["train"]["max"] == 12


def test_cli_reads_parquet(tmp_path, capsys):
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]}).to_parquet(str(tmp_path / "train.parquet"))
    main(["stats", str(tmp_path / "train.parquet"), "--json"])
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["real_tokens"] == 5


def test_text_without_a_tokenizer_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match=r"split 'validation': its examples are text .*pass --tokenizer"):
        main(["stats", str(data_dir / "validation.jsonl")])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such path"):
        main(["stats", str(tmp_path / "nope.jsonl")])


def chat_tokenizer_dir(tmp_path):
    path = tmp_path / "tokenizer"
    char_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("layout", ["messages", "conversational prompt/completion"])
def test_cli_counts_chat_rows_through_the_template(tmp_path, capsys, layout):
    """Conversations are counted through the tokenizer's chat template, one length per row."""
    problems = arithmetic_problems(6, seed=2)
    user = [[{"role": "user", "content": p["prompt"]}] for p in problems]
    assistant = [[{"role": "assistant", "content": p["completion"]}] for p in problems]
    if layout == "messages":
        rows = [{"messages": u + a} for u, a in zip(user, assistant)]
    else:
        rows = [{"prompt": u, "completion": a} for u, a in zip(user, assistant)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = char_tokenizer()
    want = [len(tokenizer.apply_chat_template(u + a, tokenize=True, return_dict=True)["input_ids"])
            for u, a in zip(user, assistant)]
    main(["stats", str(tmp_path / "train.jsonl"), "--tokenizer", str(chat_tokenizer_dir(tmp_path)), "--json"])
    split = json.loads(capsys.readouterr().out)["splits"]["train"]
    assert split["count"] == 6 and split["min"] == min(want) and split["max"] == max(want)
    assert split["real_tokens"] == sum(want)


def test_an_empty_split_is_named(data_dir):
    (data_dir / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"expected examples in every split, got none in \[.empty.\]"):
        main(["stats", str(data_dir / "train.jsonl"), str(data_dir / "empty.jsonl")])


# ---------------------------------------------------------------------------------------------
# Malformed rows and options
# ---------------------------------------------------------------------------------------------


def test_a_negative_length_no_longer_reports_a_negative_speedup(tmp_path):
    """Today `length: -5` prints a "packed -3.00x" speed-up."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"length": 4}\n\n{"length": -5}\n')
    with pytest.raises(ValueError, match=rf"^{path}: line 3: key 'length': expected a positive int, got -5$"):
        main(["stats", str(path)])


@pytest.mark.parametrize("flag, value", [("--max-seq-length", "-5"), ("--max-seq-length", "0"), ("--batch-size", "0"),
                                         ("--batch-size", "-2")])
def test_stats_options_must_be_positive(tmp_path, flag, value):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"length": 4}) + "\n")
    with pytest.raises(ValueError, match=rf"^{flag}: expected a positive int, got {value}$"):
        main(["stats", str(path), flag, value])


# ---------------------------------------------------------------------------------------------
# Remote code, on a terminal
# ---------------------------------------------------------------------------------------------


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
