"""Which rows each data-parallel shard learns from, as the official run orders them: pure
functions over row lengths (host, numpy). `rl.micro_batch_weighting="per_device_mean"` uses them.

Letters: R rows of a rollout batch, K devices of the official run, M rows per device per
optimizer step, m rows per device per micro-batch (a loss group), C rows of our micro-batch.

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
`device_micro_batches` lays the devices' micro-batches out as our micro-batches, whole groups
in each. K is the official run's device count, not our mesh's: the groups are a property of
the loss, and any mesh computes them.
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
    lengths: Sequence[int], devices: int, rows_per_step: int, group_rows: int, micro_rows: int
) -> list[np.ndarray]:
    """Our micro-batches (row indices, C = micro_rows each, whole groups of m = group_rows) of
    one step's R rows under per_device_mean: the rows split into K = devices balanced partitions
    (`balanced_shards`); device k's partition cut in order into mini-batches of M =
    rows_per_step / K rows and those into groups of m rows (its micro-batches). The groups of a
    mini-batch in order (micro-batch j of device 0, 1, ..., K - 1, then j + 1) are cut into our
    micro-batches of C / m groups. Listed mini-batch by mini-batch."""
    per_device = rows_per_step // devices
    if (
        rows_per_step % devices
        or per_device % group_rows
        or micro_rows % group_rows
        or rows_per_step % micro_rows
        or len(lengths) % rows_per_step
    ):
        raise ValueError(
            f"{len(lengths)} rows in optimizer steps of {rows_per_step} rows do not split into {devices} devices "
            f"x groups of {group_rows} rows, in micro-batches of {micro_rows} rows"
        )
    parts = balanced_shards(lengths, devices)
    micro = []
    for s in range(len(lengths) // rows_per_step):
        first = s * per_device
        groups = [p[j : j + group_rows] for j in range(first, first + per_device, group_rows) for p in parts]
        rows = np.concatenate(groups)  # [M * K]: the step's groups, micro-batch j of every device, then j + 1
        micro += [rows[i : i + micro_rows] for i in range(0, rows_per_step, micro_rows)]
    return micro
