"""`packcollate demo` (`packcollate.tools.demo`): the main job, at its smallest, and its settings checked."""

import pytest

from packcollate.tools.demo import run_demo


def test_demo_losses_match_and_packing_computes_fewer_tokens():
    result = run_demo(steps=3, batch_size=4, quiet=True)
    assert result["losses_match"] and result["max_loss_diff"] < 1e-4
    assert len(result["losses"]["padded"]) == len(result["losses"]["packed"]) == 3
    assert result["ideal_speedup"] > 1  # padded batches compute padding; packed ones do not


@pytest.mark.parametrize("steps, batch_size, message", [
    (1, 16, r"steps: expected at least 2 \(step 0 is an untimed warm-up\), got 1"),
    (200, 16, r"steps x batch_size: expected at most the 2000 shipped problems, got 200 x 16 = 3200"),
])
def test_demo_rejects_impossible_settings(steps, batch_size, message):
    with pytest.raises(ValueError, match=message):
        run_demo(steps=steps, batch_size=batch_size, quiet=True)
