"""What a packed forward hands the layers packcollate restarts (`packcollate.backend.state`): backward is told apart
from forward (`state.in_backward`), so that a layer recomputed without its forward's layout refuses instead of
running unpacked."""

import torch


def test_backward_is_told_apart_from_forward():
    """A restarted layer recomputed during backward without its forward's layout refuses instead of
    running unpacked: that needs to know it runs in backward (`state.in_backward`, read from torch)."""
    from packcollate.backend import state

    seen = []
    x = torch.ones(2, requires_grad=True)
    y = (x * 2).sum()
    y.grad_fn.register_hook(lambda *grads: seen.append(state.in_backward()))
    assert not state.in_backward()
    y.backward()
    assert seen == [True]
