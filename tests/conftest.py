"""Shared test configuration: the hypothesis profile every property test runs under; fixtures: a free port,
one torch thread per module, the padded Trainer step the packed ones are compared with."""

import socket

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.helpers import arguments, prompt_completion_dataset, weight_change

# Deterministic (derandomize) so a failure reproduces on every machine; no deadline because CI
# machines are slow and shared; 200 examples per property is "hundreds of random batches".
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=200,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous (a fixed port collides on shared CI)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, much faster on a shared, loaded machine (a module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def padded_reference(tmp_path_factory):
    """One step on all 16 examples, padded, completion-only labels: the reference weight change."""
    from transformers import Trainer

    from packcollate import PaddedCollator

    tmp = tmp_path_factory.mktemp("padded")
    dataset = prompt_completion_dataset()
    return weight_change(Trainer, tmp, collator=PaddedCollator(passthrough_keys=["idx"]),
                         args=arguments(tmp, remove_unused_columns=False), train_dataset=dataset)
