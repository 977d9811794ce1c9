"""Length buckets (`packcollate.backend.buckets`): the examples of a packed row as a few batches of similar length,
every token exactly once."""

import numpy as np

import packcollate  # noqa: F401
from packcollate.backend import buckets


def test_buckets_group_similar_lengths():
    plans = buckets.plan_buckets([100, 95, 90, 20, 3, 2], buckets.ATTENTION_COST)
    widths = [g.shape[1] for g, _ in plans]
    assert widths[0] == 100 and len(plans) < 6
    covered = np.sort(np.concatenate([gather[i, :n] for gather, ls in plans for i, n in enumerate(ls)]))
    assert covered.tolist() == list(range(310))  # every token exactly once
