"""`packcollate stats` and the length statistics behind it."""

import json

import datasets
import numpy as np
import pytest
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from packcollate.tools.cli import main
from packcollate.batching.lengths import length_stats, padded_tokens, recommend_max_seq_length
from packcollate.compat.configs import context_length
from packcollate.tools.toy import arithmetic_problems, char_tokenizer, tokenize_prompt_completion


def test_context_length_reads_every_known_key():
    assert context_length(LlamaConfig(max_position_embeddings=4096)) == (4096, "max_position_embeddings")
    assert context_length(GPT2Config(n_positions=1024))[0] == 1024  # GPT-2 maps max_position_embeddings to it
    chatglm_like = PretrainedConfig(seq_length=32768)
    assert context_length(chatglm_like) == (32768, "seq_length")
    assert context_length(PretrainedConfig()) == (None, None)


def test_padded_tokens_matches_a_plain_computation():
    lengths = np.random.default_rng(0).integers(1, 100, 37)
    shuffled = np.random.default_rng(3).permutation(lengths)
    expected = sum(max(shuffled[i : i + 8]) * len(shuffled[i : i + 8]) for i in range(0, 37, 8))
    assert padded_tokens(lengths, 8, seed=3) == expected


def test_length_stats():
    stats = length_stats([10, 20, 30, 400], batch_size=4, max_seq_length=25)
    assert (stats.count, stats.min, stats.max, stats.over) == (4, 10, 400, 2)
    assert stats.real_tokens == 460 and stats.padded_tokens == 1600
    assert stats.packed_speedup == pytest.approx(1600 / 460)
    assert stats.padding_waste == pytest.approx(1 - 460 / 1600)


def test_recommendation_covers_every_split_and_respects_the_context():
    splits = {"train": np.array([100, 200]), "validation": np.array([50, 700])}
    assert recommend_max_seq_length(splits) == 768  # 700 * 1.05 -> 735, next multiple of 64
    assert recommend_max_seq_length(splits, context_limit=512) == 512


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


def test_console_script_prints_input_errors_on_one_line(tmp_path, capsys):
    from packcollate.tools.cli import console_main

    assert console_main(["stats", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("packcollate stats: error: DATA:") and "no such path" in err and "Traceback" not in err

