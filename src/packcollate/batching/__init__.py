"""Which examples share a batch: token-budget batches of whole examples, every rank its own.

- `sampler.py`: `TokenBudgetBatchSampler`, an epoch planned from the lengths of every example;
- `stream.py`: `TokenBudgetStream`, the same online over a bounded buffer of a stream;
- `lengths.py`: the example lengths they plan from (Arrow columns, rows, given lengths), and their statistics.
"""

from .sampler import TokenBudgetBatchSampler
from .stream import TokenBudgetStream

__all__ = ["TokenBudgetBatchSampler", "TokenBudgetStream"]
