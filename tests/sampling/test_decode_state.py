"""The decode loop's parts on their own: admission, one step and the first-token draw, on
hand-made slot states with a stand-in model whose next-token logits and cache writes are
known, so every field can be checked against a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.models.api import Cache as KVCache
from emor3_jax.sampling.methods import GREEDY
from emor3_jax.sampling.sampler import (
    Carry,
    Draw,
    GroupRows,
    Prefilled,
    Settings,
    Waiting,
    admit,
    fresh,
    step,
    waiting_rows,
)

V, W, P, G = 16, 4, 6, 5  # vocab, slots, prompt bucket, generation bucket
PAD = 0


def _draw(stops=(-1,)):
    return Draw(jnp.asarray(stops, jnp.int32), jnp.zeros((V,), jnp.float32), jax.random.key(0), jnp.int32(PAD))


def _cache(rows, entries, fill=0.0):
    """A one-layer, one-head cache [1, rows, entries, 1, 1] ([Y, B, S, K, H]): each entry holds
    one number."""
    x = jnp.full((1, rows, entries, 1, 1), fill, jnp.float32)
    return KVCache(x, x + 0.5)


class NextToken:
    """A stand-in model: token t is followed by (t + 1) % V for sure; decode writes each row's
    token id at its entry and records the span it was asked to read."""

    def __init__(self):
        self.spans = []

    def embed(self, ids):
        return ids.astype(jnp.float32)[..., None]  # [B, 1, 1]

    def decode(self, x, positions, span, cache, entry):
        self.spans.append((span.start, span.end, entry, positions))
        rows = jnp.arange(x.shape[0])
        write = lambda c: c.at[0, rows, entry, 0, 0].set(x[:, 0, 0])
        return x, cache.replace(keys=write(cache.keys), values=write(cache.values))

    def logits(self, h):
        nxt = (h[:, 0].astype(jnp.int32) + 1) % V
        return jnp.where(jax.nn.one_hot(nxt, V) > 0, 0.0, -3.0)


def _group(n=2, valid=3, row0=10, limits=(3, 2, 5, 1)):
    """Two prompts (n=2 rows each); prompt q's cache entries all hold 100 + q."""
    q = 2
    pc = jnp.broadcast_to(100.0 + jnp.arange(q, dtype=jnp.float32)[None, :, None, None, None], (1, q, P, 1, 1))
    logits = jnp.where(jax.nn.one_hot(jnp.array([3, 7]), V) > 0, 0.0, -3.0)  # prompt 0 -> 3, prompt 1 -> 7
    pre = Prefilled(logits, KVCache(pc, pc), start=jnp.array([2, 4], jnp.int32), pos=jnp.array([20, 30], jnp.int32))
    rows = GroupRows(jnp.asarray(limits, jnp.int32), jnp.int32(row0), jnp.int32(valid), jnp.bool_(True))
    return pre, rows


def test_first_tokens_are_drawn_from_each_rows_prompt():
    pre, rows = _group()
    s = Settings(2, GREEDY, True)
    wait = waiting_rows(s, pre, rows, _draw())
    np.testing.assert_array_equal(wait.prompt, [0, 0, 1, 1])
    np.testing.assert_array_equal(wait.token, [3, 3, 7, 7])
    np.testing.assert_allclose(wait.logp, -np.log1p((V - 1) * np.exp(-3.0)) * np.ones(4), rtol=1e-6)


@pytest.mark.parametrize("continuous", [True, False])
def test_free_slots_take_the_waiting_rows_in_order(continuous):
    pre, rows = _group()
    s = Settings(2, GREEDY, continuous)
    c = fresh(W, 16, G, PAD)
    busy = c.slots.replace(row=jnp.array([5, -1, 6, -1], jnp.int32), token=jnp.array([9, 0, 9, 0], jnp.int32))
    c = c.replace(slots=busy, step=jnp.int32(4))
    wait = Waiting(jnp.array([3, 3, 7, 7]), jnp.array([-0.1, -0.2, -0.3, -0.4]), jnp.array([0, 0, 1, 1]))
    cache = _cache(W, P + G, fill=-1.0)
    c2, cache2, pending = admit(s, c, cache, jnp.int32(1), pre, rows, wait)
    if not continuous:  # two slots busy: nobody is admitted
        assert int(pending) == 1
        np.testing.assert_array_equal(c2.slots.row, busy.row)
        np.testing.assert_array_equal(cache2.keys, cache.keys)
        return
    # Rows 1 and 2 of the group (output rows 11, 12) wait; slots 1 and 3 are free.
    assert int(pending) == 3
    np.testing.assert_array_equal(c2.slots.row, [5, 11, 6, 12])
    np.testing.assert_array_equal(c2.slots.token, [9, 3, 9, 7])
    np.testing.assert_allclose(c2.slots.logp, [0, -0.2, 0, -0.3])
    np.testing.assert_array_equal(c2.slots.limit, [0, 2, 0, 5])
    np.testing.assert_array_equal(c2.slots.start, [0, 2, 0, 4])
    np.testing.assert_array_equal(c2.slots.pos, [0, 20, 0, 30])
    np.testing.assert_array_equal(c2.slots.step, [0, 0, 0, 0])
    k = np.asarray(cache2.keys)[0, :, :, 0, 0]
    np.testing.assert_array_equal(k[1, :P], 100.0)  # prompt 0's cache
    np.testing.assert_array_equal(k[3, :P], 101.0)  # prompt 1's cache
    np.testing.assert_array_equal(k[[0, 2]], -1.0)  # busy slots untouched
    np.testing.assert_array_equal(k[1, P:], -1.0)  # generated entries are not copied
    np.testing.assert_array_equal(np.asarray(c2.out.slot)[[11, 12]], [1, 3])
    np.testing.assert_array_equal(np.asarray(c2.out.start)[[11, 12]], [4, 4])
    assert (np.asarray(c2.out.slot)[:11] == -1).all()


def test_a_step_emits_writes_at_its_own_entry_and_frees_on_stop_or_limit():
    s = Settings(1, GREEDY, True)
    c = fresh(W, 8, G, PAD)
    slots = c.slots.replace(
        row=jnp.array([0, 1, -1, 2], jnp.int32),
        step=jnp.array([0, 2, 0, 1], jnp.int32),
        pos=jnp.array([10, 20, 0, 30], jnp.int32),
        limit=jnp.array([5, 3, 0, 5], jnp.int32),
        start=jnp.array([1, 3, 0, 2], jnp.int32),
        token=jnp.array([4, 5, 0, 11], jnp.int32),
        logp=jnp.array([-1.0, -2.0, 0.0, -3.0]),
    )
    c = c.replace(slots=slots)
    model = NextToken()
    c2, cache = step(s, model, c, _cache(W, P + G), P, _draw(stops=(11,)))
    start, end, entry, positions = model.spans[0]
    np.testing.assert_array_equal(entry, [P, P + 2, P, P + 1])  # token j at entry P + j
    np.testing.assert_array_equal(start, [1, 3, 0, 2])
    np.testing.assert_array_equal(end, np.asarray(entry) + 1)  # the span ends at the new token
    np.testing.assert_array_equal(positions[0, :, 0], [10, 22, 0, 31])
    k = np.asarray(cache.keys)[0, :, :, 0, 0]
    assert k[0, P] == 4 and k[1, P + 2] == 5 and k[3, P + 1] == 11
    out = c2.out
    np.testing.assert_array_equal(np.asarray(out.tokens)[[0, 1, 2], [0, 2, 1]], [4, 5, 11])
    np.testing.assert_allclose(np.asarray(out.logprobs)[[0, 1, 2], [0, 2, 1]], [-1.0, -2.0, -3.0])
    np.testing.assert_array_equal(np.asarray(out.lengths)[:3], [1, 3, 2])
    np.testing.assert_array_equal(np.asarray(out.done)[:3], [False, False, True])  # row 2 hit stop 11
    # Row 1 reached its limit of 3, row 2 stopped: their slots are free; the free slot stays free.
    np.testing.assert_array_equal(c2.slots.row, [0, -1, -1, -1])
    np.testing.assert_array_equal(c2.slots.step, [1, 3, 0, 2])
    assert int(c2.slots.token[0]) == 5 and int(c2.step) == 1  # 4 is followed by 5
    assert (np.asarray(out.tokens)[3:] == PAD).all()  # nothing written for free slots


def test_carry_is_a_pytree_of_arrays():
    c = fresh(W, 8, G, PAD)
    assert isinstance(c, Carry)
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(c)}
    assert shapes[".slots.row"] == (W,) and shapes[".out.tokens"] == (8, G) and shapes[".step"] == ()
