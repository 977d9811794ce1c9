"""Configs that name remote code (`packcollate.compat.remote_code`; ChatGLM2's `config.json`: `model_type: chatglm`,
`auto_map`, `seq_length: 32768`): `packcollate stats --model` reads the context limit from `config.json` as data,
and `packcollate check` says in one line what is needed. No code from the folder ever runs here."""

import json

import pytest

from packcollate.compat.configs import context_length_from_json
from packcollate.compat.remote_code import remote_code_files
from packcollate.tools.cli import console_main

CHATGLM2 = {  # the fields of THUDM/chatglm2-6b's config.json that matter here (written, not downloaded)
    "_name_or_path": "THUDM/chatglm2-6b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
    "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "multi_query_group_num": 2,
    "padded_vocab_size": 65024, "seq_length": 32768, "use_cache": True, "torch_dtype": "float16",
}
CODE_FILES = ["configuration_chatglm.py", "modeling_chatglm.py"]


@pytest.fixture
def chatglm_dir(tmp_path):
    folder = tmp_path / "chatglm2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CHATGLM2))
    return folder


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": list(range(n))}) for n in (5, 40, 300)) + "\n")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = console_main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_reads_seq_length_from_config_json(capsys, chatglm_dir, data_file):
    code, out, err = run(capsys, "stats", data_file, "--model", chatglm_dir)
    assert code == 0, err
    assert "model context limit: 32768 (seq_length in config.json)" in out
    code, out, _ = run(capsys, "stats", data_file, "--model", chatglm_dir / "config.json", "--json")
    assert code == 0 and json.loads(out)["context_limit"] == 32768


def test_check_names_the_flag_and_the_files_in_one_line(capsys, chatglm_dir):
    code, out, err = run(capsys, "check", chatglm_dir)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "needs remote code" in err and "--trust-remote-code" in err
    assert all(file in err for file in CODE_FILES)


def test_trusted_but_missing_files_is_one_clear_line(capsys, chatglm_dir):
    (chatglm_dir / "configuration_chatglm.py").write_text("")  # present, never imported: the model file is missing
    code, out, err = run(capsys, "check", chatglm_dir, "--trust-remote-code")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.strip().endswith("copy the model's .py files into the folder")
    assert "missing modeling_chatglm.py;" in err


def test_no_code_from_the_folder_runs_without_the_flag(capsys, chatglm_dir, data_file, tmp_path):
    marker = tmp_path / "ran"
    for file in CODE_FILES:
        (chatglm_dir / file).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert run(capsys, "stats", data_file, "--model", chatglm_dir)[0] == 0
    assert run(capsys, "check", chatglm_dir)[0] == 2
    assert not marker.exists()


def test_config_json_as_data():
    assert remote_code_files(CHATGLM2) == CODE_FILES
    assert remote_code_files({"auto_map": {"AutoConfig": "org/repo--configuration_x.XConfig"}}) == ["org/repo/configuration_x.py"]
    assert remote_code_files({"model_type": "llama"}) == []
    assert context_length_from_json(CHATGLM2) == (32768, "seq_length")
    assert context_length_from_json({"text_config": {"max_position_embeddings": 4096}}) == (4096, "max_position_embeddings")
    assert context_length_from_json({"max_position_embeddings": True}) == (None, None)
