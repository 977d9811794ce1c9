"""The static checks of a model for packing (`packcollate.compat.static_checks`): position_ids, which route
(kwargs, mask, position_ids) carries the layout, position offsets, multimodal rope sections, recurrent layers,
the context length and the `use_cache` pitfall.

Every model is a tiny random copy built from a config (CPU, fp32, nothing downloaded).
"""

import warnings

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, PretrainedConfig

import packcollate
from packcollate import PackedCollator
from packcollate.compat import (
    ERROR,
    EXACT,
    OK,
    WARNING,
    check_context_length,
    check_layout_route,
    check_model,
    check_position_ids,
    check_position_offset,
    check_recurrent_layers,
    check_rope_sections,
    check_use_cache,
    proof_features,
)
from tests.helpers import tiny_eager_model as tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def packed_batch(**options) -> dict:
    return PackedCollator(**options)(proof_features())


class ForwardWithoutPositions(torch.nn.Module):
    def forward(self, input_ids, labels=None):
        return input_ids


class ForwardWithKwargs(torch.nn.Module):
    def forward(self, input_ids, labels=None, **kwargs):
        return input_ids


def test_position_ids_finding():
    from transformers import LlamaForCausalLM

    assert check_position_ids(LlamaForCausalLM).status == OK
    hidden = check_position_ids(ForwardWithKwargs)
    assert hidden.status == WARNING and "only **kwargs" in hidden.message
    missing = check_position_ids(ForwardWithoutPositions)
    assert missing.status == ERROR
    assert "takes no position_ids" in missing.message and "PaddedCollator" in missing.fix


class DroppingLayoutKwargs(torch.nn.Module):
    """Wraps an attention module and drops the flash-attn kwargs before calling it: a decoder layer that
    does not pass **kwargs on (as StableLM's did in transformers 5.23)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(key, None)
        return self.inner(*args, **kwargs)


class AttentionWrittenInside(torch.nn.Module):
    """An attention module that never calls transformers' AttentionInterface (as GPT-J's and CodeGen's
    did up to transformers 5.23): the attention backend does not decide what it attends to."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states, **kwargs):
        return self.proj(hidden_states), None


def llama_with_attention(make) -> torch.nn.Module:
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn = make(layer.self_attn)
    return model


def test_layout_route_finding():
    """Which carriers of the layout reach attention, on models built to show each case. Which real
    families drop kwargs or bypass AttentionInterface changes between transformers releases (5.24
    moved GPT-J and CodeGen onto AttentionInterface), so no real family is pinned here; the matrix
    (`packcollate check --all`) records them per release."""
    llama = check_layout_route(tiny_model("llama"), packed_batch())
    assert llama.status == OK and "cu_seq_lens_q reaches all" in llama.message
    dropping = check_layout_route(llama_with_attention(DroppingLayoutKwargs), packed_batch())
    assert dropping.status == WARNING and dropping.note == "kwargs dropped"
    assert "use_cache=False: mask, position_ids" in dropping.message
    assert "attn_implementation='packcollate'" in dropping.fix
    inside = check_layout_route(
        llama_with_attention(lambda attn: AttentionWrittenInside(attn.config.hidden_size)), packed_batch()
    )
    assert inside.status == WARNING and "AttentionInterface" in inside.message
    assert inside.note == "no AttentionInterface calls"


@pytest.mark.parametrize("model_type", ["stablelm", "gptj", "codegen"])
def test_layout_route_finding_agrees_with_the_proof(model_type):
    """On families whose route moved between releases, whatever the probe finds this release, the
    packcollate backend's verdict must follow from it: a route that carries the layout, or attention
    written inside the model (which packcollate runs per example), is exact."""
    finding = check_layout_route(tiny_model(model_type), packed_batch())
    report = check_model(model_type, backends=["packcollate"])
    if finding.status == OK or finding.note in ("kwargs dropped", "attention inside the model"):
        result = report.result("packcollate")
        refused_switch = "does not switch attention backends after loading" in result.note  # GPT-J on 5.17
        assert result.trial(False).verdict == EXACT or refused_switch, (finding.message, result.note)
    else:
        assert finding.note in ("no AttentionInterface calls", "layout lost", "probe raised"), finding.message


def test_roberta_position_offset():
    config = AutoConfig.for_model("roberta")  # pad_token_id=1: positions start at 2
    for model in (None, tiny_model("roberta", is_decoder=True)):
        finding = check_position_offset(config, model)
        assert finding.status == WARNING
        assert finding.fix == "PackedCollator(position_ids_start=2)"
    assert check_position_offset(LlamaConfig(), tiny_model("llama")).status == OK


def test_multimodal_rope_finding():
    rope = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}  # as Qwen2-VL ships it
    qwen2_vl = check_rope_sections(AutoConfig.for_model("qwen2_vl", text_config={"rope_parameters": rope}))
    assert qwen2_vl.status == WARNING and "mrope_section=[16, 24, 24]" in qwen2_vl.message
    assert "get_rope_index" in qwen2_vl.fix
    assert "'qwen2_vl'" in check_rope_sections(AutoConfig.for_model("qwen2_vl")).message  # known by model type
    with warnings.catch_warnings():  # rope_scaling, the older spelling of rope_parameters: some releases warn
        warnings.simplefilter("ignore", FutureWarning)
        generic = PretrainedConfig(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    assert check_rope_sections(generic).status == WARNING
    assert check_rope_sections(LlamaConfig()).status == OK


def test_recurrent_layers_finding():
    # config only: Mamba-2 / Jamba layer types say "state along the sequence"; packcollate restarts it
    for model_type in ("mamba2", "jamba"):
        finding = check_recurrent_layers(AutoConfig.for_model(model_type))
        assert finding.status == WARNING and finding.fix.startswith("attn_implementation='packcollate'")
        assert "PackedCollator(return_seq_idx=True)" in finding.fix
    # a built model: the finding names its token mixers, what they read, and the packcollate restart
    for model_type in ("bamba", "zamba", "mamba2", "qwen3_5_text"):
        model = tiny_model(model_type)
        finding = check_recurrent_layers(model.config, model)
        mixers = {type(module).__name__ for _, module in packcollate.backend.restart.token_mixers(model)}
        assert finding.status == WARNING and mixers and all(name in finding.message for name in mixers)
        assert finding.fix.startswith("attn_implementation='packcollate'") and "restart" in finding.message
    assert check_recurrent_layers(LlamaConfig(), tiny_model("llama")).status == OK


def test_context_length_finding():
    llama = LlamaConfig(max_position_embeddings=4096)
    assert check_context_length(llama).status == OK
    assert check_context_length(llama, 4096).status == OK
    too_long = check_context_length(llama, 8192)
    assert too_long.status == ERROR and "max_position_embeddings=4096" in too_long.message
    assert "PackedCollator(max_seq_length=4096)" in too_long.fix
    chatglm = PretrainedConfig(seq_length=8192)  # ChatGLM names its context seq_length
    assert "config.seq_length=8192" in check_context_length(chatglm, 32768).message
    assert check_context_length(PretrainedConfig(), 10**6).status == OK  # no maximum named


def test_use_cache_pitfall_finding():
    cached = check_use_cache(LlamaConfig(use_cache=True))
    assert cached.status == WARNING and "model.config.use_cache = False" in cached.fix
    assert "packcollate" in cached.fix
    assert check_use_cache(LlamaConfig(use_cache=False)).status == OK
