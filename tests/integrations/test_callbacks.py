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
