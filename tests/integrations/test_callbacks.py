"""Trainer callbacks (`packcollate.integrations.callbacks`): `PackingGuardCallback` stops a run before its first step
when packed batches would mix examples, and lets the packcollate backend train."""

import pytest
from transformers import TrainerControl

from packcollate import PackedCollator
from packcollate.integrations.callbacks import PackingGuardCallback
from tests.helpers import tiny_eager_model as tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_guard_callback_stops_training():
    control = TrainerControl()
    with pytest.raises(RuntimeError, match="differ from the same examples one at a time"):
        PackingGuardCallback().on_train_begin(None, None, control, model=tiny_model("llama", "sdpa"))
    assert control.should_training_stop
    ours = PackingGuardCallback(collator=PackedCollator())
    assert not ours.on_train_begin(None, None, TrainerControl(), model=tiny_model("llama", "packcollate")).should_training_stop


def test_the_train_start_check_leaves_the_random_state_as_it_was(tmp_path):
    """[17] H7: PackedTrainer's train-start proof builds tiny copies from seed 0; the caller's CPU (and CUDA)
    random state is exactly what it was before it (dropout and sampling follow the user's seed)."""
    import torch
    from transformers import TrainerCallback

    from packcollate.integrations import PackedTrainer
    from tests.helpers import arguments, prompt_completion_dataset

    states = []

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            states.append([torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])])

    model = tiny_model("qwen2", attn_implementation="packcollate", initializer_range=0.0171)  # a config no proof has seen
    trainer = PackedTrainer(model=model, args=arguments(tmp_path, max_steps=1, seed=7), callbacks=[Snapshot()],
                            train_dataset=prompt_completion_dataset(n=8))
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("Snapshot") < names.index("PackingGuardCallback")
    trainer.add_callback(Snapshot())
    trainer.train()
    before, after = states
    assert all(torch.equal(a, b) for a, b in zip(before, after))
