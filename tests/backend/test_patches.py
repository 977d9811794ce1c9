"""Models that pool their tokens into patches (BLT): packed equals each example alone, forward and backward.

Every test builds a tiny random BLT (CPU, fp32) on the packcollate backend and compares one packed forward
and backward against each example alone through transformers' eager attention: logits to 1e-4, every
gradient to 1e-3 of its scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import packcollate
from packcollate import PackedCollator
from packcollate.backend import patches
from packcollate.backend.preparation import check_prepared
from packcollate.compat import compare_packed_unpacked
from packcollate.compat.tiny import tiny_config
from packcollate.errors import NotPreparedError, UnsupportedError
from packcollate.layout import from_cu_seq_lens

pytestmark = pytest.mark.skipif("blt" not in CONFIG_MAPPING, reason="this transformers has no BLT")

LENGTHS = (11, 1, 27, 2, 5, 19)


def features(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, 256, n).tolist()} for n in lengths]


def blt(threshold: str | float = "median", encoder_all_layers: bool = False, prepared: bool = True,
        attn_implementation: str = "packcollate", **overrides) -> torch.nn.Module:
    """A tiny BLT; `threshold="median"` sets the entropy threshold to the median entropy of the test bytes, so
    patches hold one or several bytes, and some examples end on an empty patch."""
    torch.manual_seed(0)
    config = tiny_config("blt", **overrides)
    config.encoder_config.cross_attn_all_layers = encoder_all_layers
    model = packcollate.prepare(AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval())
    if threshold == "median" and model.model.patcher is not None:
        ids = torch.tensor([sum((f["input_ids"] for f in features()), [])])
        with torch.no_grad():
            entropies = model.model.patcher(ids, patch_size=config.patch_size, threshold=0.0)[0]
        threshold = float(entropies.median())
    if threshold != "median":
        model.config.patching_threshold = threshold
    if prepared:
        return model
    unprepared = AutoModelForCausalLM.from_config(model.config, attn_implementation=attn_implementation).eval()
    unprepared.load_state_dict(model.state_dict())
    return unprepared


def exact(model, collator=None, use_cache=False, lengths=LENGTHS):
    result = compare_packed_unpacked(model, features(lengths), collator=collator, reference_attn_implementation="eager",
                                     use_cache=use_cache)
    assert result.max_logit_diff <= 1e-4, result
    assert result.max_grad_rel_diff <= 1e-3, result
    return result


def packed_patches(model, lengths=LENGTHS) -> patches.PatchLayout:
    batch = PackedCollator()(features(lengths))
    layout = from_cu_seq_lens(batch["cu_seq_lens_q"], batch["max_length_q"], 1, batch["input_ids"].shape[1])
    return patches.patch_layout(model.model, batch["input_ids"], layout)


@pytest.mark.parametrize("flash_kwargs", [True, False])
@pytest.mark.parametrize("variant", ["entropy", "entropy-every-byte", "max-patch-length", "no-patcher",
                                     "encoder-cross-attention-every-layer"])
def test_packed_equals_each_example_alone(variant, flash_kwargs):
    """Each variant takes another path through the patches: entropy patches of one or several bytes with empty
    patches after some examples; every byte a patch (the tiny config's threshold) with an empty patch after every
    example; `max_patch_length` splitting patches and dropping empty ones; no entropy model (every byte a patch,
    plus one empty patch); and the encoder's cross-attention after every layer (an empty patch's query is then not
    zero, and it averages the whole row: harmless, as no byte reads it). With `cu_seq_lens` or `position_ids` only."""
    model = {
        "entropy": lambda: blt(),
        "entropy-every-byte": lambda: blt(threshold=1.0),
        "max-patch-length": lambda: blt(max_patch_length=2),
        "no-patcher": lambda: blt(patch_in_forward=False),
        "encoder-cross-attention-every-layer": lambda: blt(encoder_all_layers=True),
    }[variant]()
    exact(model, PackedCollator(return_flash_attn_kwargs=flash_kwargs))


def test_the_proof_runs_examples_whose_patches_differ():
    """The entropy test above is not vacuous: its examples get patches of several bytes and of one, some end on an
    empty patch and some do not, and without the hooks the same batch is wrong (the ablations below)."""
    layout = packed_patches(blt())
    lengths = layout.lengths[0]
    assert int(lengths.max()) > 1 and int((lengths == 1).sum()) > 0
    last = layout.cu_patches[1:].long() - 1
    assert 0 < int((lengths[last] == 0).sum()) < len(LENGTHS)


@pytest.mark.parametrize("hook", ["_before_global_transformer", "_before_local_decoder"])
def test_each_part_needs_its_hook(hook, monkeypatch):
    """Without one part's patch units the packed forward is wrong or refused (a test that cannot fail is a defect):
    the global transformer then gets the bytes' layout (refused: it describes other tokens), the decoder hands an
    example's last byte the next example's first patch (wrong)."""
    monkeypatch.setattr(patches, hook, patches._without_patches)
    model = blt()
    if hook == "_before_global_transformer":
        with pytest.raises(ValueError, match="cu_seq_lens_q: expected it to end at the batch's"):
            compare_packed_unpacked(model, features(), reference_attn_implementation="eager")
        return
    result = compare_packed_unpacked(model, features(), reference_attn_implementation="eager")
    assert result.max_logit_diff > 1e-3


def test_hash_embeddings_restart_at_every_example():
    """The n-gram hashes of an example's first bytes see zeros, as at a row start, not the previous example."""
    model = blt().model
    batch = PackedCollator()(features())
    layout = from_cu_seq_lens(batch["cu_seq_lens_q"], batch["max_length_q"], 1, batch["input_ids"].shape[1])
    packed = patches.restarted_hash_embeddings(model, batch["input_ids"], layout)
    from transformers.models.blt.modeling_blt import compute_hash_embeddings

    config = model.config
    alone = [compute_hash_embeddings(torch.tensor([f["input_ids"]]), model.local_encoder, model.encoder_hash_tok_embedding,
                                     config.encoder_hash_byte_group_nb_functions, config.encoder_hash_byte_group_size,
                                     config.encoder_hash_byte_group_vocab) for f in features()]
    torch.testing.assert_close(packed, torch.cat(alone, 1), rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 14), min_size=1, max_size=5), quantile=st.floats(0.0, 1.0),
       max_patch_length=st.sampled_from([None, 1, 3]))
def test_patch_layout_equals_the_model_alone(lengths, quantile, max_patch_length):
    """Property, against transformers' own code run on each example alone: the patch lengths its entropy model
    cuts (`BltPatcher`, `max_patch_length`), and the patch its decoder hands each byte
    (`_patch_ids_from_lengths(patch_lengths[:, 1:])`)."""
    model = _PROPERTY_MODEL
    model.config.max_patch_length = max_patch_length
    ids = torch.tensor([sum((f["input_ids"] for f in features(lengths)), [])])
    with torch.no_grad():
        entropies = model.patcher(ids, patch_size=model.config.patch_size, threshold=0.0)[0]
    model.config.patching_threshold = float(torch.quantile(entropies, quantile))
    cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
    layout = patches.patch_layout(model, ids, from_cu_seq_lens(cu, max(lengths), 1, ids.shape[1]))
    for e, f in enumerate(features(lengths)):
        alone = torch.tensor([f["input_ids"]])
        with torch.no_grad():
            own = model.patcher(alone, patch_size=model.config.patch_size, threshold=model.config.patching_threshold,
                                max_patch_length=max_patch_length)[1]
        first, last = int(layout.cu_patches[e]), int(layout.cu_patches[e + 1])
        assert layout.lengths[0, first:last].tolist() == own[0].tolist()
        decoder = model._patch_ids_from_lengths(own[:, 1:], alone.shape[1])[0]
        assert (layout.decoder_patch[int(cu[e]):int(cu[e + 1])] - first).tolist() == decoder.tolist()
        assert layout.positions[0, first:last].tolist() == list(range(last - first))


_PROPERTY_MODEL = blt(threshold=1.0).model if "blt" in CONFIG_MAPPING else None


@pytest.mark.parametrize("flash_kwargs", [True, False])
@pytest.mark.parametrize("given_cache", [True, False])
def test_with_a_cache_equals_each_example_alone(given_cache, flash_kwargs):
    """transformers' BLT builds its own cache from a config it cannot read (`BltConfig` has no
    `num_hidden_layers`: `use_cache=True` raises in transformers 5.24 and 5.25 on every backend); a packed forward
    gets a plain one. With it or with the user's, the packed forward that fills it equals each example alone (no
    cache, eager), forward and backward, also with `position_ids` only (with a cache transformers' mask does not
    look for packed sequences, and BLT's layers get no `position_ids`: the hooks hand them `cu_seq_lens`)."""
    model = blt()
    batch = PackedCollator(return_flash_attn_kwargs=flash_kwargs)(features())
    def cache():
        return {"cache": EncoderDecoderCache(DynamicCache(), DynamicCache())} if given_cache else {}

    grads = []
    for kwargs in ({**cache(), "use_cache": True}, {"use_cache": False}):  # without a cache: exact (tests above)
        model.zero_grad()
        model(**batch, **kwargs).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for with_cache, without in zip(*grads, strict=True):
        torch.testing.assert_close(with_cache, without, rtol=0, atol=0)
    with torch.no_grad():
        packed = model(**batch, **cache(), use_cache=True).logits[0]
        model.set_attn_implementation("eager")
        alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0]
                           for f in features()])
    assert float((packed - alone).abs().max()) <= 1e-4


def test_gradient_checkpointing_and_training_mode():
    """Checkpointed layers recompute with the patch layout of their own forward."""
    model = blt()
    model.gradient_checkpointing_enable()
    model.train()
    exact(model)


def test_one_example_on_the_backend_keeps_the_sliding_window():
    """BLT's self-attention layers do not pass their sliding window to the attention backend (only eager's mask
    carries it): the hooks hand it on, so one example longer than the window matches eager too."""
    model = blt()
    window = model.config.encoder_config.sliding_window
    ids = torch.tensor([features((3 * window,))[0]["input_ids"]])
    ours = model(input_ids=ids, use_cache=False).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(ours, model(input_ids=ids, use_cache=False).logits, atol=1e-4, rtol=0)


def test_an_unprepared_model_refuses_in_one_line():
    """At its first packed forward (the mask function), and in `check_prepared` (what `assert_packing_safe` runs)."""
    model = blt(prepared=False)
    batch = PackedCollator()(features())
    with pytest.raises(NotPreparedError, match=r"^blt(_patcher)?: .*pools its tokens into patches.*packcollate.prepare\(model\)") as info:
        model(**batch, use_cache=False)
    assert "\n" not in str(info.value)
    with pytest.raises(NotPreparedError, match="BltModel"):
        check_prepared(model)


@pytest.mark.parametrize("given_", ["inputs_embeds", "patch_lengths"])
def test_what_it_cannot_restart_is_refused_in_one_line(given_):
    model = blt()
    batch = PackedCollator()(features())
    if given_ == "inputs_embeds":
        batch["inputs_embeds"] = model.get_input_embeddings()(batch.pop("input_ids"))
        match = "only from input_ids"
    else:
        batch["patch_lengths"] = torch.ones_like(batch["input_ids"])
        match = "only when it cuts them itself"
    with pytest.raises(UnsupportedError, match=match) as info:
        model(**batch, use_cache=False)
    assert "\n" not in str(info.value)


def test_padded_batches_and_other_backends_run_as_transformers_runs_them():
    """The hooks act only on a packed forward on the packcollate backend."""
    model = blt()
    padded = packcollate.PaddedCollator()(features())
    with torch.no_grad():
        assert model(**padded, use_cache=False).logits.shape[:2] == padded["input_ids"].shape
    eager = blt(attn_implementation="eager")
    reference = blt(attn_implementation="eager", prepared=False)
    ids = torch.tensor([features()[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=ids, use_cache=False).logits,
                                   reference(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)


def test_lora_adapters_pack_exactly():
    """PEFT's LoRA around BLT's projections: `prepare` on the wrapper finds the BLT inside."""
    peft = pytest.importorskip("peft")
    model = blt(prepared=False)
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj"]))
    exact(packcollate.prepare(wrapped))


def test_packed_trainer_step_equals_each_example_alone(tmp_path):
    """`PackedTrainer` prepares an unprepared BLT (its train-start guard proves the packing on a tiny copy) and
    applies the update of each example alone through eager (SGD, lr 1: the change is minus the gradient)."""
    import datasets

    from packcollate.compat.equivalence import reference_run
    from packcollate.integrations import PackedTrainer
    from tests.helpers import arguments, weight_change

    reference = blt(prepared=False, attn_implementation="eager")
    alone = reference_run(reference, features(), PackedCollator(), "unpacked", False, torch.device("cpu"))
    change = weight_change(PackedTrainer, tmp_path, model=blt(prepared=False),
                           train_dataset=datasets.Dataset.from_list(features()),
                           args=arguments(tmp_path, per_device_train_batch_size=len(LENGTHS)))
    for name, grad in alone.grads.items():
        if grad is not None:
            scale = grad.norm().clamp_min(1e-12)
            assert float((change[name] + grad).norm() / scale) < 1e-4, name
