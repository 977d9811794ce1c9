"""Which examples share a batch: token-budget batches of whole examples, every rank its own.

- `sampler.py`: `TokenBudgetBatchSampler`, an epoch planned from the lengths of every example;
- `stream.py`: `TokenBudgetStream`, the same online over a bounded buffer of a stream;
- `bins.py`: what both plan with: packing into bins within the budget, equal bin counts over ranks,
  bins grouped into steps;
- `ranks.py`: what both share about data-parallel ranks: the `torch.distributed` defaults and the
  resume-state checks;
- `lengths.py`: the example lengths they plan from (Arrow columns, rows, given lengths), and their statistics.
"""

from .sampler import TokenBudgetBatchSampler
from .stream import TokenBudgetStream

__all__ = ["TokenBudgetBatchSampler", "TokenBudgetStream"]
