"""Packed updates: the packer (every row once, within the pack length, shards balanced by
tokens) and packed log-probs / gradients equal to the padded rows' on the tiny model with
images (several per prompt, text-only rows, different prompt and response lengths)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from qwen_fixtures import IMAGE, make_batch

from emor3_jax.core.batches import Prompt
from emor3_jax.rl import packing
from emor3_jax.rl.learner import GRPOSettings, Learner
from emor3_jax.rl.rows import packed_rows, training_rows
from emor3_jax.sampling.rollout import Rollouts


def test_first_fit_decreasing_by_hand():
    # capacity 10: 6 -> A, 5 -> B, 4 -> A (full), 3 -> B, 2 -> B (full). First fit in input
    # order instead (6, 5, 4 -> A, B, B) would make three packs.
    assert packing.first_fit([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="row 1 has 11 tokens, more than the pack length 10"):
        packing.first_fit([3, 11], 10)


def test_balance_by_hand_and_beats_contiguous_split():
    # longest first to the lightest shard: 10 -> s0, 9 -> s1, 8 -> s1, 7 -> s0, 6 -> s0 (tie
    # 17 / 17: the lower), 5 -> s1: loads 23 / 22. Halving the rows in order gives 27 / 18.
    assert packing.balance([10, 9, 8, 7, 6, 5], 2) == [[0, 3, 4], [1, 2, 5]]
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(1, 500, 64))[::-1].tolist()  # sorted: a contiguous split is at its worst
    loads = [sum(lengths[i] for i in s) for s in packing.balance(lengths, 8)]
    contiguous = [sum(lengths[i : i + 8]) for i in range(0, 64, 8)]
    assert max(loads) - min(loads) <= max(lengths)
    assert max(loads) - min(loads) < (max(contiguous) - min(contiguous)) / 10


def test_pack_count_buckets():
    got = [packing.pack_count(n) for n in range(1, 18)]
    assert got == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16, 24]


@pytest.mark.parametrize("shards", [1, 3, 8])
def test_plan_puts_every_row_once_within_the_length_shard_major(shards):
    rng = np.random.default_rng(shards)
    lengths = rng.integers(1, 300, 40).tolist()
    capacity = 512
    packs = packing.plan(lengths, capacity, shards)
    assert sorted(i for p in packs for i in p) == list(range(40))  # every row exactly once
    assert all(sum(lengths[i] for i in p) <= capacity for p in packs)
    per = len(packs) // shards
    assert per * shards == len(packs) and packing.pack_count(per) == per
    # shard s holds packs s*per .. s*per+per-1; their tokens are balanced like `balance`'s groups
    loads = [sum(lengths[i] for p in packs[s * per : (s + 1) * per] for i in p) for s in range(shards)]
    want = sorted(sum(lengths[i] for i in g) for g in packing.balance(lengths, shards))
    assert sorted(loads) == want


# ---------------------------------------------------------------- packed == padded

PROMPTS = [[5, ("image", 8, 12), 6], [9], [2, ("image", 4, 4), 3, ("image", 8, 8), 4]]  # 37, 9, 33 tokens
LENGTHS = np.array([7, 1, 4, 6, 3, 5])  # responses of rows 0..5 (n = 2 per prompt)
G = 7


def _rollouts():
    rng = np.random.default_rng(0)
    prompts = []
    for segs in PROMPTS:
        b = make_batch([segs], rng)
        grid = b.get("image_grid_thw")
        prompts.append(Prompt(b["input_ids"][0], b.get("pixel_values"), grid))
    tokens = rng.integers(1, IMAGE - 10, (len(LENGTHS), G)).astype(np.int32)
    return Rollouts([{}] * 3, prompts, 2, tokens, LENGTHS, None, [])


def test_packed_logprobs_and_gradients_equal_the_padded_rows(ours_fp32):
    """Two shards, pack length 64: the six rows (13 to 44 tokens) go 3 + 3 to the shards and two
    to a pack, rows of different prompts and images side by side. Wrong positions (counting on
    across a pack), attention across segments (measured: 10 of 26 tokens off) or images
    scattered in row order instead of pack order each change the log-probs past rtol 1e-4."""
    cfg, ro, rows = ours_fp32.cfg, _rollouts(), np.arange(len(LENGTHS))
    graphdef, params = nnx.split(ours_fp32)
    learner = Learner(graphdef, optax.sgd(1.0), chunk=16)
    padded, mask, p_len, g_len = training_rows(ro, cfg, 0, (48,), rows)
    packed, packed_mask = packed_rows(ro, cfg, 0, 64, 2, rows)
    np.testing.assert_array_equal(packed_mask, mask)
    seg = np.asarray(packed.batch.segment_ids)
    assert seg.max(axis=1).tolist() == [2, 1, 2, 1]  # per shard: a pack of two rows, a pack of one
    assert int((seg > 0).sum()) == sum(len(ro.prompts[r // 2].ids) for r in rows) + LENGTHS.sum()
    # logits only at response tokens: per pack the 13 at most any pack holds, as a width of 64
    assert packed.scored.shape == (4, 64) and (packed.scored > 0).sum() == LENGTHS.sum()

    want = np.asarray(learner.logprobs(params, padded, p_len - 1, g_len))
    got = np.asarray(learner.packed_logprobs(params, packed))
    m = mask.astype(bool)
    np.testing.assert_allclose(got[m], want[m], rtol=1e-4, atol=1e-6)

    rng = np.random.default_rng(1)
    old = want + 0.05 * rng.standard_normal(want.shape).astype(np.float32)  # ratios != 1: clipping in play
    ref = want + 0.1 * rng.standard_normal(want.shape).astype(np.float32)
    adv = rng.standard_normal(len(rows)).astype(np.float32)
    settings = GRPOSettings(clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.1, kl_kind="k3", loss_mode="token")
    args = (old, ref, adv, mask, 1.0, settings)
    g_pad, m_pad = learner.grpo_grads(params, padded, p_len - 1, g_len, *args)
    g_pack, m_pack = learner.packed_grpo_grads(params, packed, *args)
    np.testing.assert_allclose(float(m_pack["loss"]), float(m_pad["loss"]), rtol=1e-4)
    np.testing.assert_allclose(float(m_pack["entropy"]), float(m_pad["entropy"]), rtol=1e-4)
    leaves_pad, leaves_pack = jax.tree.leaves(g_pad), jax.tree.leaves(g_pack)
    assert max(float(np.abs(np.asarray(a)).max()) for a in leaves_pad) > 1e-3  # a gradient to compare
    for a, b in zip(leaves_pad, leaves_pack):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()) + 1e-9)


def test_score_width_rounds_to_a_few_widths_within_the_pack():
    assert [packing.score_width(n, 4096) for n in (0, 1, 64, 65, 129, 200, 300, 1000)] == [
        64,
        64,
        64,
        128,
        192,
        256,
        384,
        1024,
    ]
    assert packing.score_width(5000, 4096) == 4096 and packing.score_width(100, 96) == 96


def test_a_row_longer_than_the_pack_length_is_refused(ours_fp32):
    ro = _rollouts()
    with pytest.raises(ValueError, match=r"row of 44 tokens .* --config.rl.pack_length=40"):
        packed_rows(ro, ours_fp32.cfg, 0, 40, 1, np.arange(len(LENGTHS)))
