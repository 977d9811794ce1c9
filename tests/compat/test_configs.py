"""Model configs read for the command line (`packcollate.compat.configs`): the context length under every key a
family names it by, and a `config.json` that is not JSON refused in one line."""

import pytest
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from packcollate.compat.configs import context_length, read_config_json


def test_context_length_reads_every_known_key():
    assert context_length(LlamaConfig(max_position_embeddings=4096)) == (4096, "max_position_embeddings")
    assert context_length(GPT2Config(n_positions=1024))[0] == 1024  # GPT-2 maps max_position_embeddings to it
    chatglm_like = PretrainedConfig(seq_length=32768)
    assert context_length(chatglm_like) == (32768, "seq_length")
    assert context_length(PretrainedConfig()) == (None, None)


def test_unreadable_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="expected a JSON object, got invalid JSON"):
        read_config_json(tmp_path)
