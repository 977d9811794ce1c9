"""Shared test configuration: the hypothesis profile every property test runs under."""

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
