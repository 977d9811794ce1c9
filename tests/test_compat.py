"""Model compatibility: the static findings, the numeric proof, the CLI, the guard and `--all`.

Every model is a tiny random copy built from a config (CPU, fp32, nothing downloaded). The full
matrix over every architecture of transformers is a documented command (`packcollate check --all`,
docs/compatibility.md), not a test.
"""

import json
import os
import signal
import time
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, TrainerControl

import packcollate  # registers the packcollate backend
from packcollate import PackedCollator
from packcollate.tools import cli
from packcollate.compat import (
    CONTAMINATED,
    ERROR,
    EXACT,
    OK,
    UNSUPPORTED,
    WARNING,
    assert_packing_safe,
    check_context_length,
    check_layout_route,
    check_model,
    check_position_ids,
    check_position_offset,
    check_recurrent_layers,
    check_rope_sections,
    check_use_cache,
    proof_features,
    tiny_config,
)
from packcollate.integrations.callbacks import PackingGuardCallback
from packcollate.tools.matrix import check_all, check_architecture


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, much faster on a shared, loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(model_type: str, attn_implementation: str = "eager", **overrides):
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def packed_batch(**options) -> dict:
    return PackedCollator(**options)(proof_features())


# --- static findings ------------------------------------------------------------------------------


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


def test_tiny_copies_of_architectures_that_needed_care():
    """Properties without setters (Falcon), nested sub-configs (DBRX), MLA (DeepSeek-V3), Mamba heads
    (Bamba, Zamba2), per-layer configs (Gemma 4) and composite configs (MusicGen's decoder)."""
    for model_type in ("falcon", "dbrx", "deepseek_v3", "bamba", "zamba2", "gemma4_text"):
        model = tiny_model(model_type)
        assert sum(p.numel() for p in model.parameters()) < 2_000_000, model_type
        model(input_ids=torch.tensor([proof_features()[1]["input_ids"]]), use_cache=False).logits.sum().backward()


def test_tiny_copy_of_a_composite_config():
    """MusicGen's config nests its decoder's: the tiny copy is proven on the decoder part."""
    try:
        AutoConfig.for_model("musicgen")
    except Exception as error:  # noqa: BLE001 - read at run time: transformers 5.17's default does not validate
        pytest.skip(f"this transformers cannot build MusicGen's default config: {type(error).__name__}")
    assert check_architecture("musicgen", backends=["eager"])["backends"]


# --- numeric proof --------------------------------------------------------------------------------


def test_llama_is_exact_with_packcollate_and_sdpa_without_cache():
    report = check_model("llama", backends=["sdpa", "packcollate"])
    assert report.architecture == "LlamaForCausalLM" and not report.error
    packcollate_result, sdpa = report.result("packcollate"), report.result("sdpa")
    assert [t.verdict for t in packcollate_result.trials] == [EXACT, EXACT]
    assert packcollate_result.trial(False).max_logit_diff < 1e-5
    assert report.ok_for("packcollate")
    # sdpa: exact without a cache, contaminated with one (transformers ignores packing then)
    assert sdpa.trial(False).verdict == EXACT and sdpa.trial(True).verdict == CONTAMINATED
    assert sdpa.trial(True).max_logit_diff > 1e-2
    assert sdpa.verdict == CONTAMINATED and sdpa.note == "contaminated only with use_cache=True"
    assert report.ok_for("sdpa", use_cache=False) and not report.ok_for("sdpa")
    table = report.format_table()
    assert "contaminated only with use_cache=True" in table and "static checks:" in table
    assert json.loads(json.dumps(report.to_dict()))["backends"][1]["verdict"] == EXACT


def refuses_backend(model_type: str, backend: str) -> bool:
    """Whether transformers refuses to build `model_type` with `backend` (read at run time: Gemma 2
    refuses sdpa in transformers 5.23 and 5.24, not in 5.17)."""
    try:
        AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=backend)
    except ValueError:
        return True
    return False


def test_unsupported_backends_keep_the_error():
    report = check_model("gemma2", backends=["sdpa", "flex_attention", "packcollate"])
    sdpa, flex = report.result("sdpa"), report.result("flex_attention")
    if refuses_backend("gemma2", "sdpa"):
        assert sdpa.verdict == UNSUPPORTED and "does not support" in sdpa.note
    else:
        assert sdpa.verdict != UNSUPPORTED, sdpa.note
    assert flex.verdict == UNSUPPORTED and flex.trial(False).error  # no flex backward on CPU
    assert "\n" not in flex.trial(False).error and "\n" not in sdpa.trial(False).error
    assert report.verdict("packcollate") == EXACT


def test_roberta_is_proven_with_its_position_offset():
    report = check_model("roberta", backends=["packcollate"])
    assert report.collator_options["position_ids_start"] == 2
    assert report.verdict("packcollate") == EXACT


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_exit_status_follows_the_chosen_backend(capsys):
    assert cli.main(["check", "llama"]) == 0  # packcollate: exact
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert cli.main(["check", "llama", "--backend", "sdpa", "--json"]) == 1  # contaminated with a cache
    printed = json.loads(capsys.readouterr().out)
    assert printed["backends"][0]["verdict"] == CONTAMINATED
    assert cli.main(["check", "llama", "--backend", "packcollate", "--max-seq-length", "100000"]) == 1
    assert "exceeds config.max_position_embeddings" in capsys.readouterr().out
    assert cli.main(["check"]) == 2


# --- runtime guard --------------------------------------------------------------------------------


def test_guard_raises_for_a_contaminating_setup_and_passes_for_packcollate():
    sdpa = tiny_model("llama", attn_implementation="sdpa")  # config.use_cache=True, the default
    with pytest.raises(RuntimeError, match=r"LlamaForCausalLM with attn_implementation='sdpa' and use_cache=True"):
        assert_packing_safe(sdpa)
    assert_packing_safe(sdpa, use_cache=False)  # what Trainer uses: exact
    assert_packing_safe(tiny_model("llama", attn_implementation="packcollate"))


def test_guard_callback_stops_training():
    control = TrainerControl()
    with pytest.raises(RuntimeError, match="differ from the same examples one at a time"):
        PackingGuardCallback().on_train_begin(None, None, control, model=tiny_model("llama", "sdpa"))
    assert control.should_training_stop
    ours = PackingGuardCallback(collator=PackedCollator())
    assert not ours.on_train_begin(None, None, TrainerControl(), model=tiny_model("llama", "packcollate")).should_training_stop


# --- --all machinery --------------------------------------------------------------------------------


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


def test_half_precision_trial_leaves_the_shared_model_untouched():
    """The bf16 trial (flash-attn backends, CUDA) runs on a copy: later fp32 trials see unrounded weights."""
    from transformers import LlamaForCausalLM

    from packcollate.compat import proof as proofs

    model = proofs.tiny_model(LlamaForCausalLM, tiny_config("llama"), "cpu")
    proof = proofs.prepare_proof(model, proof_features(), PackedCollator(), torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    trial = proofs.half_precision_trial(model, proof, use_cache=False)  # on eager here: any backend will do
    assert trial.verdict == EXACT
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert proofs.prove_backend(model, proof, "packcollate").trial(False).verdict == EXACT
