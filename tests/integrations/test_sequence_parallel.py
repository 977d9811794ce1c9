"""Sequence parallelism over packed rows (`packcollate.integrations.sequence_parallel`): a row split across
2 gloo ranks (Ulysses) equals one process on the same row: logits, loss and gradients, fp32, 1e-5 relative.

The rows (`tests.helpers.SEQUENCE_PARALLEL_LENGTHS`) have an odd length (33: shards of 16 and 17 tokens) and
an example straddling the shard edge; the cases cover grouped-query K/V split over the ranks (2 K/V heads),
one K/V head repeated over them, Qwen2 with the sequence-weighted loss, and gradient checkpointing.
"""

import importlib.util
import itertools
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from packcollate import PackedCollator, PaddedCollator
from packcollate.backend.sequence_parallel import kv_repeats
from packcollate.errors import (
    InputError,
    LayoutError,
    PackcollateError,
    UnsupportedError,
)
from packcollate.integrations import sequence_parallel
from packcollate.integrations.sequence_parallel import (
    SHARD_KEY,
    deepspeed_sequence_parallel,
    prepare_sequence_parallel,
    sequence_parallel_forward,
    sequence_parallel_loss,
    shard_bounds,
    shard_packed_batch,
    shifted_labels,
    ulysses_loss_on_every_rank,
)
from packcollate.objectives.losses import count_loss_examples, sequence_weighted_loss
from tests.helpers import (
    build_prepared,
    sequence_parallel_case,
    sequence_parallel_rows,
    tiny_backend_model,
    tiny_model,
)
from tests.scripts.two_ranks import launch

CASES = ("llama_gqa", "llama_mqa", "qwen2_sequence", "llama_checkpointed")


def one_process(case: str, rows: list[int]):
    """The loss, gradients and logits of the first row of `rows` in one process, for the same model and
    weighting; the loss and gradients over all `rows` (each row's loss summed, normalised over all rows)."""
    torch.set_num_threads(1)
    model, batches, weighting = sequence_parallel_case(case)
    model.train()
    outputs = [model(**{k: v for k, v in batches[r].items() if k != "labels"}).logits for r in rows]
    if weighting == "token":
        flat_logits = torch.cat([o[0, :-1] for o in outputs])
        flat_labels = torch.cat([batches[r]["labels"][0, 1:] for r in rows])
        loss = torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
    else:
        count = count_loss_examples([batches[r] for r in rows], across_ranks=False)
        loss = sum(sequence_weighted_loss(o, batches[r]["labels"], batches[r]["cu_seq_lens_q"], count)
                   for o, r in zip(outputs, rows))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, outputs[0].detach()


def assert_close(expected: torch.Tensor, got: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    error = float((expected - got).detach().norm() / expected.norm().clamp_min(1e-12))
    assert error < rtol, f"{what}: relative difference {error:.2e}"


def check_run(saved: dict, rows: list[int], cases=CASES) -> None:
    for case, got in zip(cases, (saved[case] for case in cases)):
        loss, grads, logits = one_process(case, rows)
        assert_close(logits, got["logits"], f"{case} logits")
        assert_close(loss, got["loss"], f"{case} loss")
        for name, grad in grads.items():
            assert_close(grad, got["grads"][name], f"{case} gradient of {name}")


def test_two_ranks_equal_one_process(tmp_path, free_port):
    out = tmp_path / "sp.pt"
    launch("sequence_parallel_step.py", str(out), port=free_port)
    check_run(torch.load(out), rows=[0])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="4 gloo ranks need at least 2 cores")
def test_two_data_parallel_by_two_sequence_parallel_ranks_and_one_group_of_four_equal_one_process(tmp_path, free_port):
    out = tmp_path / "dpsp.pt"
    launch("sequence_parallel_step.py", str(out), "--dp", "2", port=free_port, nproc=4)
    saved = torch.load(out)
    check_run(saved, rows=[0, 1])
    saved["llama_gqa"] = saved["llama_gqa_world"]  # one group of 4 ranks: shards of 8, 8, 8 and 9 tokens
    check_run(saved, rows=[0], cases=["llama_gqa"])


# ---------------------------------------------------------------------------------------------
# One process: the split, the labels, the refusals (a 1-rank gloo group)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A 1-rank gloo process group for this module (destroyed after it)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shards_balance_tokens_and_cover_the_row():
    assert shard_bounds(33, 2) == (0, 16, 33)
    assert shard_bounds(40, 4) == (0, 10, 20, 30, 40)
    bounds = shard_bounds(1001, 7)
    assert max(b - a for a, b in zip(bounds, bounds[1:])) - min(b - a for a, b in zip(bounds, bounds[1:])) <= 1


def test_labels_are_shifted_inside_each_example_before_the_split():
    labels = torch.tensor([[1, 2, 3, 4, 5, 6]])
    got = shifted_labels(labels, torch.tensor([0, 2, 6], dtype=torch.int32))
    assert got.tolist() == [[2, -100, 4, 5, 6, -100]]  # token 1 ends example 0: it predicts nothing


def test_head_counts_the_group_does_not_split_are_refused_in_one_line():
    assert kv_repeats(4, 2, 2) == 1
    assert kv_repeats(8, 2, 4) == 2  # each of 4 ranks gets one (repeated) K/V head
    assert kv_repeats(4, 1, 2) == 2
    with pytest.raises(UnsupportedError, match="6 attention heads do not split over a group of 4"):
        kv_repeats(6, 6, 4)
    with pytest.raises(UnsupportedError, match="3 key/value heads neither split"):
        kv_repeats(12, 3, 2)


@pytest.mark.parametrize("model_type, layer", [
    ("lfm2", "Lfm2ShortConv"), ("qwen3_5_text", "Qwen3_5GatedDeltaNet"),
    ("deepseek_v32", "DeepseekV32Attention"),  # reads the 4-D mask: runs per example
    ("bart", "BartLearnedPositionalEmbedding"),  # numbers the row's tokens itself
    ("blt", "BltModel"),  # pools the row's bytes into patches
])
def test_layers_that_must_see_each_example_whole_are_refused_before_the_first_step(one_rank, model_type, layer):
    model = build_prepared(model_type)
    with pytest.raises(UnsupportedError, match=f"carry state along the sequence.*{layer}") as error:
        prepare_sequence_parallel(model)
    assert "\n" not in str(error.value)


def test_a_model_on_another_backend_is_refused(one_rank):
    with pytest.raises(UnsupportedError, match="expected 'packcollate'"):
        prepare_sequence_parallel(tiny_backend_model("llama", attn_implementation="sdpa"))


def test_an_unprepared_model_is_refused(one_rank):
    shard = shard_packed_batch(sequence_parallel_rows()[0])
    with pytest.raises(UnsupportedError, match="was not prepared for this group"):
        sequence_parallel_forward(tiny_backend_model("llama"), shard)


def test_bad_rows_are_refused(one_rank):
    row = sequence_parallel_rows()[0]
    with pytest.raises(InputError, match="'pixel_values'"):
        shard_packed_batch({**row, "pixel_values": torch.zeros(1)})
    with pytest.raises(LayoutError, match="input_ids: expected one packed row"):
        shard_packed_batch({**row, "input_ids": row["input_ids"].expand(2, -1)})
    with pytest.raises(LayoutError, match="cu_seq_lens_q: expected increasing offsets"):
        shard_packed_batch({**row, "cu_seq_lens_q": torch.tensor([0, 5, 4, 33], dtype=torch.int32)})
    assert torch.equal(row["labels"], sequence_parallel_rows()[0]["labels"])  # the input is not changed


def test_one_rank_equals_the_model_and_its_loss(one_rank):
    """A group of one: the shard is the row, the share the loss (the model's own, token-mean)."""
    model, rows, _ = sequence_parallel_case("llama_gqa")
    batch = rows[0]
    shard = shard_packed_batch(batch)
    assert set(shard) == {"input_ids", "position_ids", "shift_labels", SHARD_KEY}
    prepare_sequence_parallel(model)
    logits = sequence_parallel_forward(model, shard).logits
    expected = model(**batch)
    assert_close(expected.logits, logits, "logits")
    assert_close(expected.loss, sequence_parallel_loss(logits, shard), "loss")
    with pytest.raises(InputError, match="loss_weighting"):
        sequence_parallel_loss(logits, shard, loss_weighting="example")


# ---------------------------------------------------------------------------------------------
# PackedTrainer under accelerate's ParallelismConfig(sp_backend="deepspeed"): DeepSpeed's Ulysses
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra")
@pytest.mark.skipif(ulysses_loss_on_every_rank(), reason="this transformers' Ulysses loss is refused (tested below)")
@pytest.mark.parametrize("trainer", ["packed", "sft"])
def test_packed_trainer_under_deepspeed_ulysses_equals_one_process(tmp_path, free_port, trainer):
    """PackedTrainer, and PackedSFTTrainer (TRL's fused LM head on DeepSpeed's shift_labels, SFTConfig's
    gradient checkpointing; fp32), split over 2 ranks: the loss and every gradient of one process."""
    if trainer == "sft" and importlib.util.find_spec("trl") is None:
        pytest.skip("needs the trl extra")
    out = tmp_path / "ulysses.pt"
    launch("ulysses_trainer_step.py", str(out), trainer, port=free_port, timeout=300)
    saved = torch.load(out)
    row = saved["row"]
    assert "cu_seq_lens_q" not in row and row["input_ids"].shape[1] % 128 == 0  # padded to the budget, no offsets
    starts = row["position_ids"][0].eq(0).nonzero().flatten().tolist()
    assert len(starts) >= 3  # several examples in the row
    half = row["input_ids"].shape[1] // 2
    assert any(a < half < b for a, b in itertools.pairwise(starts)), starts  # an example straddles the shard edge
    torch.set_num_threads(1)
    model = tiny_model()
    loss = model(**row).loss
    loss.backward()
    assert abs(float(loss) - saved["loss"]) < 1e-4 * float(loss)  # the log rounds
    for name, p in model.named_parameters():
        assert_close(p.grad, saved["grads"][name], f"gradient of {name}")


def ulysses_trainer(model, cls=SimpleNamespace, **overrides):
    """What `deepspeed_sequence_parallel` reads of a trainer, under ParallelismConfig(sp_backend="deepspeed", sp_size=2)."""
    config = SimpleNamespace(sp_enabled=True, sp_size=2, sp_backend="deepspeed", sp_handler=None)
    trainer = cls(accelerator=SimpleNamespace(parallelism_config=config), model=model,
                  args=SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=1, world_size=2),
                  loss_weighting="token",
                  data_collator=PackedCollator(), max_tokens_per_batch=128)
    for key, value in overrides.items():
        setattr(trainer.args if hasattr(trainer.args, key) else trainer, key, value)
    return trainer


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model": "sdpa"}, "packed examples would attend to each other"),
    ({"model": "lfm2"}, "carry state along the sequence"),
    ({"per_device_train_batch_size": 4}, "expected per_device_train_batch_size=1"),
    ({"loss_weighting": "sequence"}, "loss_weighting='sequence' is not split across ranks"),
    ({"gradient_accumulation_steps": 2}, "expected gradient_accumulation_steps=1 and one sequence-parallel group, got 2 and 1"),
    ({"world_size": 4}, "expected gradient_accumulation_steps=1 and one sequence-parallel group, got 1 and 2"),
    ({"data_collator": PaddedCollator()}, "expected packcollate's PackedCollator"),
])
def test_trainer_under_deepspeed_ulysses_refuses_before_the_first_step(overrides, message, monkeypatch):
    monkeypatch.setattr(sequence_parallel, "ulysses_loss_on_every_rank", lambda: False)
    model = {"sdpa": lambda: tiny_model("sdpa"), "lfm2": lambda: build_prepared("lfm2")}.get(overrides.pop("model", None), tiny_model)()
    with pytest.raises(PackcollateError, match=message) as error:
        deepspeed_sequence_parallel(ulysses_trainer(model, **overrides))
    assert "\n" not in str(error.value)


def trl_like(name: str):
    """A trainer class whose base is named like TRL's `name`, from a `trl.` module."""
    base = type(name, (SimpleNamespace,), {"__module__": f"trl.trainer.{name.lower()}"})
    return type(f"Packed{name}", (base,), {})


def test_a_ulysses_loss_backpropagated_on_every_rank_is_refused(monkeypatch):
    """transformers 5.24's Ulysses loss: every rank backpropagates the row's loss and DeepSpeed sums the
    group's gradients, so a step applied 2x the gradient on 2 ranks (measured by the 2-rank test's applied update)."""
    monkeypatch.setattr(sequence_parallel, "ulysses_loss_on_every_rank", lambda: True)
    with pytest.raises(UnsupportedError, match=r"applies sp_size x the gradient .* upgrade to transformers>=5.25") as error:
        deepspeed_sequence_parallel(ulysses_trainer(tiny_model()))
    assert "\n" not in str(error.value)


def test_trl_trainers_other_than_sft_under_deepspeed_ulysses_are_refused(monkeypatch):
    monkeypatch.setattr(sequence_parallel, "ulysses_loss_on_every_rank", lambda: False)
    """Only PackedTrainer and PackedSFTTrainer are proven equal to one process under Ulysses."""
    with pytest.raises(UnsupportedError, match="TRL's DPOTrainer under DeepSpeed's Ulysses is not proven"):
        deepspeed_sequence_parallel(ulysses_trainer(tiny_model(), cls=trl_like("DPOTrainer")))
    trainer = ulysses_trainer(tiny_model(), cls=trl_like("SFTTrainer"), per_device_train_batch_size=4)
    with pytest.raises(InputError, match="expected per_device_train_batch_size=1"):  # past the TRL check
        deepspeed_sequence_parallel(trainer)


def test_trainer_without_sequence_parallelism_is_left_alone():
    trainer = ulysses_trainer(tiny_model())
    trainer.accelerator.parallelism_config = None
    collator = trainer.data_collator
    assert deepspeed_sequence_parallel(trainer) == 1 and trainer.data_collator is collator
