"""Length buckets: the examples of a packed row as a few right-padded batches of similar length.

Exact attention and the restarted recurrent layers both run a packed row's examples apart without a
Python loop over them: the examples, longest first, are cut into consecutive buckets; each bucket is
one batched call `(G, L, …)` over its `G` examples, each right-padded to the bucket's longest `L`
by repeating its own last token (causal layers never look ahead, and attention masks the padding).

Where to cut is one dynamic program over the cut points (one vectorised step per distinct length):
it minimises the padded work, `sum over buckets of G * L ** work_exponent` (2 for attention: key/query
pairs; 1 for recurrent layers: tokens), plus `bucket_cost` per bucket (what one more call costs, in
the same unit). `bucket_plan` computes the gather and scatter indices once per layout (every layer
of a forward shares them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layout import SequenceLayout, cumulative


@dataclass(frozen=True)
class CostModel:
    """What a bucket costs: `G * L ** work_exponent + bucket_cost`."""

    work_exponent: int
    bucket_cost: float


#: Attention: work grows with the key/query pairs; one more bucket costs about a 64 x 64 attention.
ATTENTION_COST = CostModel(work_exponent=2, bucket_cost=64 * 64)
# Recurrent layers: work grows with the padded tokens. Each bucket is one more call of the layer (about
# ten kernels forward and backward). Measured on a tiny Mamba-2 train step (CPU, 16 FLAN-like examples):
# 32 and 256 tokens a bucket equally fast, 1024 1.45x slower, one bucket for all 3.7x slower (its
# PyTorch scan grows faster than linearly with the padded length).
RECURRENT_COST = CostModel(work_exponent=1, bucket_cost=128)
# No padding at all: one bucket per distinct length (every padded token costs, a bucket costs nothing). For
# layers whose outputs padding could reach (a sparse indexer's top-k over the bucket's keys).
UNPADDED_COST = CostModel(work_exponent=1, bucket_cost=0)


def plan_buckets(lengths, cost: CostModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group sequences of similar length; per bucket: `(G, L)` gather index into the `(M,)` tokens
    and `(G,)` lengths. Inside a bucket each sequence is right-padded by repeating its own last token
    index. See the module docstring for the cost minimised.

    Cuts fall between distinct lengths only (splitting equal lengths never costs less), so the dynamic
    program has one vectorised step per distinct length, not per sequence."""
    lengths_np = np.asarray(lengths, dtype=np.int64)
    starts = cumulative(lengths_np)[:-1]
    order = np.argsort(-lengths_np, kind="stable")
    widths, counts = np.unique(lengths_np[order][::-1], return_counts=True)
    widths, counts = widths[::-1].astype(np.float64), counts[::-1]  # distinct lengths, longest first
    before = np.concatenate([[0], np.cumsum(counts)])  # sequences before each distinct length
    groups = len(widths)
    best = np.zeros(groups + 1)  # best[j]: cost of the first j distinct lengths
    cut = np.zeros(groups + 1, dtype=np.int64)  # cut[j]: where the last bucket of the first j starts
    work = widths ** cost.work_exponent
    for j in range(1, groups + 1):
        first = np.arange(j)
        costs = best[:j] + (before[j] - before[first]) * work[:j] + cost.bucket_cost
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    bounds, j = [], groups
    while j > 0:
        bounds.append((int(before[cut[j]]), int(before[j])))
        j = int(cut[j])
    plans = []
    for lo, hi in reversed(bounds):
        members = order[lo:hi]
        width = int(lengths_np[members[0]])
        offsets = np.minimum(np.arange(width)[None, :], lengths_np[members, None] - 1)
        plans.append((starts[members, None] + offsets, lengths_np[members]))
    return plans


@dataclass(frozen=True)
class Bucket:
    """One batched call: `gather` `(G * L,)` token indices (right-padded rows), `lengths` `(G,)`."""

    gather: torch.Tensor
    lengths: torch.Tensor
    count: int
    width: int


@dataclass(frozen=True)
class BucketPlan:
    """The buckets of a layout and `back` `(M,)`: where each token's output is in the buckets'
    concatenated `(sum G * L, …)` outputs."""

    buckets: list[Bucket]
    back: torch.Tensor


def bucket_plan(layout: SequenceLayout, device, cost: CostModel) -> BucketPlan:
    """The bucket plan of `layout`'s sequences on `device` (computed once per layout and cost model)."""

    def compute() -> BucketPlan:
        lengths = layout.lengths()
        back = np.empty(int(sum(lengths)), dtype=np.int64)
        buckets, offset = [], 0
        for gather, seq_lengths in plan_buckets(lengths, cost):
            count, width = gather.shape
            valid = np.arange(width)[None, :] < seq_lengths[:, None]
            back[gather[valid]] = offset + np.flatnonzero(valid.reshape(-1))
            offset += count * width
            buckets.append(Bucket(torch.from_numpy(gather.reshape(-1)).to(device),
                                  torch.from_numpy(seq_lengths).to(device), count, width))
        return BucketPlan(buckets, torch.from_numpy(back).to(device))

    return layout.derived(("buckets", cost, str(device)), compute)
