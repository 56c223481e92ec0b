"""Which rows each data-parallel shard learns from, as the official run orders them: pure
functions over row lengths (host, numpy). `rl.micro_batch_weighting="per_device_mean"` uses them.

Letters: R rows of a rollout batch, K data-parallel shards, M rows per shard per optimizer step,
m rows per shard per micro-batch.

The official trainer (EasyR1) reorders each step's whole rollout batch before anything else
(`_balance_batch`, verl/trainer/ray_trainer.py:433-448, called at :662 before the old / reference
log-probs and the update): the rows' sequence lengths (attention-mask sums: the prompt's tokens,
image tokens expanded, plus the response's through its EOS) are split into K partitions of R / K
rows each with near-equal token sums (`get_seqlen_balanced_partitions(..., equal_size=True)`,
verl/utils/seqlen_balancing.py:150-181: Karmarkar-Karp's largest differencing, :97-127), each
partition's rows in their original order; rank k gets partition k. Each rank then cuts its rows
into mini-batches of M and those into micro-batches of m, in order
(verl/workers/actor/dp_actor.py:225-236). `balanced_shards` computes the partitions the same
way (ties broken the same way, so the groupings are the official ones for the same lengths);
`device_micro_batches` lays them out as our global micro-batches: shard k's m rows at block k.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


class _Subset:
    """Rows (index, length) in the order they joined, and their token sum. Ordered by (sum,
    row count, rows): distinct subsets never tie, since no row is in two."""

    def __init__(self, rows: list[tuple[int, int]]):
        self.rows = rows
        self.sum = sum(n for _, n in rows)

    def key(self) -> tuple:
        return self.sum, len(self.rows), self.rows


class _Partial:
    """K subsets of some of the rows, largest first. Taken from the heap first: the largest
    spread (largest minus smallest sum), then the larger largest subset."""

    def __init__(self, subsets: list[_Subset]):
        self.subsets = sorted(subsets, key=_Subset.key, reverse=True)

    def spread(self) -> int:
        return self.subsets[0].sum - self.subsets[-1].sum

    def __lt__(self, other: _Partial) -> bool:
        if self.spread() != other.spread():
            return self.spread() > other.spread()
        return self.subsets[0].key() > other.subsets[0].key()

    def combine(self, other: _Partial) -> _Partial:
        """The largest subset of one joined with the smallest of the other, and so on."""
        k = len(self.subsets)
        return _Partial([_Subset(self.subsets[i].rows + other.subsets[k - 1 - i].rows) for i in range(k)])


def balanced_shards(lengths: Sequence[int], shards: int) -> list[np.ndarray]:
    """Row indices of each of `shards` partitions of R / shards rows (R = len(lengths)), their
    token sums near-equal, each in ascending order (the official `_balance_batch`, see the
    module docstring). Largest differencing: sort the rows by (length, index), cut them into
    runs of `shards` rows (one row per subset); repeatedly combine the two partial solutions
    taken first (`_Partial.__lt__`), each subset of one with the opposite-ranked of the other.
    Partitions come largest sum first."""
    lengths = [int(x) for x in lengths]
    if shards < 1 or len(lengths) % shards:
        raise ValueError(f"{len(lengths)} rows do not split into {shards} equal data-parallel shards")
    order = sorted((n, i) for i, n in enumerate(lengths))
    heap = [
        _Partial([_Subset([(i, n)]) for n, i in order[start : start + shards]])
        for start in range(0, len(order), shards)
    ]
    heapq.heapify(heap)
    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        heapq.heappush(heap, first.combine(second))
    return [np.array(sorted(i for i, _ in s.rows), np.int64) for s in heap[0].subsets]


def device_micro_batches(
    lengths: Sequence[int], shards: int, rows_per_step: int, rows_per_micro: int
) -> list[np.ndarray]:
    """Global micro-batches (row indices, K * m each) of one step's R rows under
    per_device_mean: the rows split into K balanced partitions (`balanced_shards`); shard k's
    partition cut in order into mini-batches of M = rows_per_step / K rows and those into
    micro-batches of m = rows_per_micro; global micro-batch j of mini-batch s holds shard k's
    j-th micro-batch of mini-batch s at rows k*m .. k*m + m - 1. Micro-batches are listed
    mini-batch by mini-batch."""
    if rows_per_step % shards or (rows_per_step // shards) % rows_per_micro or len(lengths) % rows_per_step:
        raise ValueError(
            f"{len(lengths)} rows in optimizer steps of {rows_per_step} rows do not split into "
            f"{shards} shards x micro-batches of {rows_per_micro} rows"
        )
    parts = balanced_shards(lengths, shards)
    per_shard = rows_per_step // shards
    micro = []
    for first in range(0, len(lengths) // shards, per_shard):
        for j in range(first, first + per_shard, rows_per_micro):
            micro.append(np.concatenate([p[j : j + rows_per_micro] for p in parts]))
    return micro
