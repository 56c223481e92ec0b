"""The official length-balanced spread of a step's rows over the data-parallel shards
(rl/balance.py), against an example worked by hand and against its invariants."""

import numpy as np
import pytest

from emor3_jax.rl.balance import balanced_shards, device_micro_batches

# 8 rows (prompt + response tokens), the rows of tests/rl/test_experience.py's per_device_mean case.
LENGTHS = [3, 8, 6, 8, 6, 10, 9, 6]


def test_two_shards_by_hand():
    """Sorted by (length, row): (3,0) (6,2) (6,4) (6,7) (8,1) (8,3) (9,6) (10,5); runs of 2 give
    partial solutions [largest first, spread]: a = [{2}:6, {0}:3] 3, b = [{7}:6, {4}:6] 0 (equal
    sums: the higher row is the larger subset), c = [{3}:8, {1}:8] 0, d = [{5}:10, {6}:9] 1.
    Taken first: a (spread 3) with d: [{2,6}:15, {0,5}:13] 2; then it with c (spread 0, larger
    top than b): [{2,6,1}:23, {0,5,3}:21] 2; then with b: [{2,6,1,4}:29, {0,5,3,7}:27].
    A split into halves in row order ([0..3]: 25, [4..7]: 31) or by alternate rows would differ."""
    parts = balanced_shards(LENGTHS, 2)
    assert [p.tolist() for p in parts] == [[1, 2, 4, 6], [0, 3, 5, 7]]
    assert [sum(LENGTHS[i] for i in p) for p in parts] == [29, 27]


def test_micro_batches_by_hand():
    """2 devices x 4 rows per step (one optimizer step), groups of 2 rows: device 0's groups
    {1, 2}, {4, 6}, device 1's {0, 3}, {5, 7}, laid out micro-batch j of each device in turn,
    then cut into our micro-batches (2 groups or 1 each)."""
    micro = device_micro_batches(LENGTHS, devices=2, rows_per_step=8, group_rows=2, micro_rows=4)
    assert [m.tolist() for m in micro] == [[1, 2, 0, 3], [4, 6, 5, 7]]
    micro = device_micro_batches(LENGTHS, devices=2, rows_per_step=8, group_rows=2, micro_rows=2)
    assert [m.tolist() for m in micro] == [[1, 2], [0, 3], [4, 6], [5, 7]]
    # two optimizer steps of 4 rows: device k's first 2 rows go to the first step
    micro = device_micro_batches(LENGTHS, devices=2, rows_per_step=4, group_rows=1, micro_rows=2)
    assert [m.tolist() for m in micro] == [[1, 0], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("seed", range(5))
def test_invariants_on_random_lengths(seed):
    """Every row in one partition, R / K rows each, in row order; the token sums' spread is at
    most the widest range of K consecutive sorted lengths (each combination keeps it within the
    larger of the two spreads); the micro-batches hold every row once, block k from shard k."""
    rng = np.random.default_rng(seed)
    shards, per_shard = 4, 16
    lengths = rng.integers(20, 4000, shards * per_shard).tolist()
    parts = balanced_shards(lengths, shards)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(lengths)))
    assert all(len(p) == per_shard and (np.diff(p) > 0).all() for p in parts)
    sums = [sum(lengths[i] for i in p) for p in parts]
    ranked = np.sort(lengths).reshape(-1, shards)
    assert max(sums) - min(sums) <= (ranked[:, -1] - ranked[:, 0]).max()
    micro = device_micro_batches(lengths, shards, rows_per_step=32, group_rows=2, micro_rows=8)
    assert len(micro) == 8 and sorted(np.concatenate(micro).tolist()) == list(range(len(lengths)))
    for j, m in enumerate(micro):
        for k in range(shards):
            step, within = divmod(j, 4)  # 4 groups per step on each device, one per micro-batch
            expect = parts[k][step * 8 + within * 2 : step * 8 + within * 2 + 2]
            np.testing.assert_array_equal(m[2 * k : 2 * k + 2], expect)


def test_shapes_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match="do not split into 3 equal"):
        balanced_shards(LENGTHS, 3)
    with pytest.raises(ValueError, match="2 devices x groups of 3 rows, in micro-batches of 3 rows"):
        device_micro_batches(LENGTHS, devices=2, rows_per_step=8, group_rows=3, micro_rows=3)
    with pytest.raises(ValueError, match="in micro-batches of 3 rows"):
        device_micro_batches(LENGTHS, devices=2, rows_per_step=8, group_rows=1, micro_rows=3)
