"""Shared test configuration: the hypothesis profile every property test runs under; a free port."""

import socket

import pytest
from hypothesis import HealthCheck, settings

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
