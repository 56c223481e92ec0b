"""Which rows go into which packed sequence: pure functions over row lengths (host, numpy).

Letters: R rows, L pack length (tokens per packed sequence), P packs.

The learner's log-prob and gradient passes run rows of different lengths packed into P
sequences of L tokens instead of padding each row to a prompt bucket plus a generation bucket.
`plan` first spreads the rows over the data-parallel shards so each shard holds about the same
number of tokens (`balance`), then packs each shard's rows (`first_fit`), and gives every shard
the same number of packs, rounded up to a few fixed counts (`pack_count`), so a run compiles a
few shapes whatever the lengths. Only response tokens are scored: `score_width` sizes the list
of positions per pack whose hidden states reach the vocabulary projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def balance(lengths: Sequence[int], shards: int) -> list[list[int]]:
    """Row indices per shard: longest row first, each to the shard with the fewest tokens so far
    (ties: the lowest shard). Greedy longest-processing-time: the fullest shard holds at most
    4/3 of the optimum, and exceeds the mean by at most the longest row."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    load = np.zeros(shards, np.int64)
    out: list[list[int]] = [[] for _ in range(shards)]
    for i in np.argsort(-np.asarray(lengths, np.int64), kind="stable"):
        s = int(np.argmin(load))
        out[s].append(int(i))
        load[s] += lengths[i]
    return out


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices per pack: first-fit decreasing (longest row first, into the first pack with
    room, else a new one); no pack holds more than `capacity` tokens. Raises naming the row when
    one alone exceeds it."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > capacity:
        i = int(lengths.argmax())
        raise ValueError(f"row {i} has {int(lengths[i])} tokens, more than the pack length {capacity}")
    packs: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        k = next((k for k, r in enumerate(room) if r >= n), len(packs))
        if k == len(packs):
            packs.append([])
            room.append(capacity)
        packs[k].append(int(i))
        room[k] -= n
    return packs


def pack_count(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k and 3 * 2^k) that is >= n: at most a
    third of the packs are filler, and about 2 log2(R) shapes over all counts."""
    if n < 1:
        raise ValueError(f"pack count must be >= 1, got {n}")
    p = 1 << (n - 1).bit_length()  # the power of two >= n
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def score_width(n: int, pack_length: int, unit: int = 64) -> int:
    """Positions scored per pack when the most response tokens any pack holds is n: unit times
    a `pack_count` (at most a third is filler, a few widths in all), at most pack_length."""
    return min(unit * pack_count(max(1, -(-n // unit))), pack_length)


def plan(lengths: Sequence[int], capacity: int, shards: int) -> list[list[int]]:
    """Row indices of each pack, shard-major: shard s holds packs s*c .. s*c + c - 1, where c =
    pack_count(the most packs a shard needs); a shard needing fewer gets empty packs. Rows are
    spread over the shards by `balance` and packed within each shard by `first_fit`."""
    per_shard = []
    for rows in balance(lengths, shards):
        packs = first_fit([lengths[i] for i in rows], capacity)
        per_shard.append([[rows[j] for j in pack] for pack in packs])
    count = pack_count(max(1, *(len(p) for p in per_shard)))
    return [pack for packs in per_shard for pack in packs + [[] for _ in range(count - len(packs))]]
