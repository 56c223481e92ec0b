"""The paged KV cache (sampling.page_size, sampling/pages.py): the sampler with its slots' caches
in a pool of pages gives the rows of the contiguous cache (greedy tokens, log-probs, lengths),
with pages that do not divide the prompt, with a pool too small for every row at once (rows
wait), on the live-span TPU kernel (interpret mode) and with the slots split over devices; the
page bookkeeping (sharing, growth, release, promises) step by step against hand counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.sampling import pages
from tests.sampling import test_continuous
from tests.sampling.test_continuous import NEW, N, _host

PROMPT_BUCKET = 64
case = test_continuous.case  # the continuous-batching tests' prompts, limits and reference rows


def _sampler(cfg, stops, max_rows=3, page_size=4, kv_pages=0, bucket=PROMPT_BUCKET):
    return test_continuous._sampler(
        cfg, max_rows, True, stops, page_size=page_size, kv_pages=kv_pages, prompt_buckets=(bucket,)
    )


def _live_rows(sampler, lengths):
    """Per decode step, the rows in slots: [(step, rows)] from the last generate's schedule."""
    sched = sampler.last_schedule
    start = np.asarray(sched.start)
    live = lambda t: [r for r in range(len(start)) if start[r] <= t < start[r] + lengths[r]]
    return [(t, live(t)) for t in range(int(sched.steps))]


@pytest.mark.parametrize(
    "page_size, kv_pages, max_rows, continuous",
    [(4, 0, 3, True), (16, 0, 3, True), (4, 20, 3, True), (4, 20, 4, False)],
)
def test_paged_rows_equal_the_contiguous_cache(ours_fp32, case, page_size, kv_pages, max_rows, continuous):
    """3 slots refilled as rows stop, pages of 4 (the 64-entry prompt in 16 pages, 8 tokens in
    2) and of 16 (4 pages, and one for the tokens); with 20 pages, room for one prompt's pages
    and two rows' tokens (16 + 2 + 2): the rows wait, two rows of one prompt at a time, also
    when 4 slots are refilled only once all are free (chunks)."""
    prompts, kw, ref, stops = case
    s = test_continuous._sampler(ours_fp32.cfg, max_rows, continuous, stops, page_size=page_size, kv_pages=kv_pages)
    _same_rows(_host(s.generate(ours_fp32, prompts, **kw)), ref)
    assert s.last_cache == (max_rows, {4: 72, 16: 80}[page_size])  # (slots, entries per slot): whole pages
    live = _live_rows(s, ref["lengths"])
    most = max(len(rows) for _, rows in live)
    if kv_pages:
        assert most == 2 and all(len({r // N for r in rows}) == 1 for _, rows in live)
    else:
        assert most == 3


def test_paged_rows_on_the_tpu_kernel_and_on_two_shards(hf_tiny_dir, ours_fp32, case):
    """The live-span TPU kernel (interpret mode) reading pages of 128 through the table (a
    128-entry prompt bucket), and 4 slots split over 2 devices, each with its own block of 20
    pages: the same rows."""
    from flax import nnx

    from emor3_jax.core import sharding
    from emor3_jax.models.qwen25_vl.convert import load_hf

    prompts, kw, ref, stops = case
    cfg = ours_fp32.cfg.replace(attention_impl="splash")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(ours_fp32)(cfg, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, nnx.split(ours_fp32)[1])
    _same_rows(_host(_sampler(cfg, stops, page_size=128, bucket=128).generate(model, prompts, **kw)), ref)

    mesh = sharding.make_mesh([("data", 2), ("fsdp", 1), ("tensor", 1)], jax.devices()[:2])
    two = load_hf(hf_tiny_dir, mesh, sharding.DEFAULT_RULES, param_dtype="float32", compute_dtype="float32")
    s = _sampler(ours_fp32.cfg, stops, max_rows=4, kv_pages=40)
    _same_rows(_host(s.generate(two, prompts, **kw)), ref)


def test_paged_int8_rows_equal_the_contiguous_int8_cache(ours_fp32, case):
    """The int8 cache paged: the int16 pairs and their scales [Y, pages, K, page] copied from the
    prefill and written by each step give the contiguous int8 cache's rows."""
    prompts, kw, _, stops = case
    int8 = dict(kv_cache_dtype="int8")
    ref = _host(test_continuous._sampler(ours_fp32.cfg, 3, True, stops, **int8).generate(ours_fp32, prompts, **kw))
    paged = test_continuous._sampler(ours_fp32.cfg, 3, True, stops, page_size=4, **int8)
    _same_rows(_host(paged.generate(ours_fp32, prompts, **kw)), ref)


def test_kv_pages_caps_the_pool_and_a_call_that_needs_fewer_takes_fewer(ours_fp32):
    """3 slots of 18 pages (16 for the 64-entry prompt in pages of 4, 2 for 8 tokens) and one
    pinned prompt's 16: 70 pages let no row wait; kv_pages=40 caps that, 1000 does not."""
    lay = lambda kv_pages: _sampler(ours_fp32.cfg, (), kv_pages=kv_pages).layout(5, 64, N, NEW)
    assert (lay(0).pages, lay(40).pages, lay(1000).pages) == (70, 40, 70)
    assert (lay(0).prompt_pages, lay(0).entries) == (16, 72)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(page_size=4, kv_pages=17), "kv_pages=17: each of the 1 shards needs at least the 18 pages of one row"),
        (dict(page_size=0, kv_pages=40), "kv_pages=40 sizes a paged cache: set page_size too"),
        (dict(page_size=-1), "page_size and kv_pages must be >= 0"),
        (dict(page_size=5), "page_size=5: a prompt bucket must be whole pages .* got bucket 64"),
    ],
)
def test_bad_page_settings_are_refused(ours_fp32, case, kw, message):
    prompts, gen_kw, _, stops = case
    with pytest.raises(ValueError, match=message):
        _sampler(ours_fp32.cfg, stops, **kw).generate(ours_fp32, prompts, **gen_kw)


def _same_rows(out, ref):
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_array_equal(out["lengths"], ref["lengths"])
    np.testing.assert_array_equal(out["done"], ref["done"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=1e-5)


# The bookkeeping by hand: 3 slots, pages of 2 entries, 2 prompts of P = 4 entries (A = 2 pages),
# slots of 3 pages (2 for the prompt, 1 for 2 tokens), 10 pages + spare.
class _Text:
    num_layers, num_kv_heads, head_dim = 1, 1, 1


W, PAGE, A, COLUMNS, L, SPARE = 3, 2, 2, 3, 10, 10


def _pool(per_shard=L, shards=1, slots=W):
    return pages.empty(_Text, slots, shards, per_shard, PAGE, COLUMNS, (2, A), jnp.float32, "")


def _prefill():
    """Prompt q's entry e holds 10 * (q + 1) + e (keys) and minus that (values): [1, 2, 4, 1, 1]."""
    x = (10 * jnp.arange(1, 3)[:, None] + jnp.arange(4)[None, :]).astype(jnp.float32)
    x = x[None, :, :, None, None]
    from emor3_jax.models.qwen25_vl.kv_cache import KVCache

    return KVCache(x, -x)


def _refs(p):
    return np.asarray(p.refs)[0].tolist()


def test_rows_of_a_prompt_share_its_pages_until_the_last_one_stops():
    p = _pool()
    take, b, limit = jnp.array([True, True, False]), jnp.array([0, 0, 0]), jnp.array([2, 1, 2])
    last = jnp.array([False, True, False])  # slot 1 takes prompt 0's last row: its pin goes
    p = pages.seat(p, pages.fits(p, take, b, limit), b, limit, last, _prefill())
    table = np.asarray(p.cache.table)
    assert table[0].tolist() == [0, 1, SPARE] and table[1].tolist() == [0, 1, SPARE]
    assert table[2].tolist() == [SPARE] * 3  # free
    assert _refs(p) == [2, 2] + [0] * 8 + [1]  # two rows hold the prompt; the spare's 1
    keys = np.asarray(p.cache.pool.keys)[0, :2, :, 0, 0]
    assert keys.tolist() == [[10, 11], [12, 13]]  # prompt 0's entries
    assert np.asarray(p.cache.pool.values)[0, 1, 1, 0, 0] == -13
    assert np.asarray(p.owed).tolist() == [1, 1, 0]

    p = pages.grow(p, jnp.array([True, True, False]), jnp.array([2, 2, 2]))
    assert np.asarray(p.cache.table)[:2, 2].tolist() == [2, 3] and _refs(p)[2:4] == [1, 1]
    assert np.asarray(p.owed).tolist() == [0, 0, 0]

    p = pages.release(p, jnp.array([True, False, False]))
    assert _refs(p) == [1, 1, 0, 1] + [0] * 6 + [1]  # slot 0's own page is free, the prompt still held
    assert np.asarray(p.cache.table)[0].tolist() == [SPARE] * 3
    p = pages.release(p, jnp.array([False, True, False]))
    assert _refs(p) == [0] * 10 + [1]  # every page back in the pool


def test_a_pinned_prompt_outlives_its_stopped_rows_until_its_last_row_is_seated():
    p = _pool()
    one = jnp.array([True, False, False])
    b, limit = jnp.zeros((3,), jnp.int32), jnp.array([2, 2, 2])
    p = pages.seat(p, one, b, limit, jnp.zeros((3,), bool), _prefill())
    assert _refs(p)[:2] == [2, 2]  # the pin and the row
    p = pages.release(p, one)
    assert _refs(p)[:2] == [1, 1]  # its rows stopped, the prompt waits for its last row
    p = pages.seat(p, one, b, limit, jnp.ones((3,), bool), _prefill())
    assert np.asarray(p.cache.table)[0, :2].tolist() == [0, 1]  # the same pages, not copied again
    assert _refs(p)[:2] == [1, 1]
    p = pages.release(p, one)
    assert _refs(p) == [0] * 10 + [1]


def test_rows_are_seated_in_order_while_their_shard_can_promise_their_pages():
    b, limit = jnp.array([0, 0, 1]), jnp.array([2, 2, 4])
    take = jnp.ones((3,), bool)
    # needs: prompt 0's 2 pages + 1, then 1, then prompt 1's 2 + 2 = 8 pages in all
    assert np.asarray(pages.fits(_pool(8), take, b, limit)).tolist() == [True, True, True]
    assert np.asarray(pages.fits(_pool(7), take, b, limit)).tolist() == [True, True, False]
    assert np.asarray(pages.fits(_pool(3), take, b, limit)).tolist() == [True, False, False]
    # a row that does not fit holds back the rows after it, even one another shard has room for
    four = pages.fits(_pool(3, shards=2, slots=4), jnp.ones((4,), bool), jnp.zeros((4,), jnp.int32), jnp.full((4,), 2))
    assert np.asarray(four).tolist() == [True, False, False, False]
    # promised pages count as taken
    p = _pool(8).replace(owed=jnp.array([2, 0, 0]))
    assert np.asarray(pages.fits(p, take, b, limit)).tolist() == [True, True, False]


def test_each_shard_gives_pages_of_its_own_block():
    """4 slots on 2 shards of 10 pages: a prompt whose rows land on both shards is copied to
    each; every slot's table names local ids; growth takes from the slot's own shard."""
    p = _pool(shards=2, slots=4)
    take, b, limit = jnp.ones((4,), bool), jnp.array([0, 0, 0, 1]), jnp.array([2, 2, 2, 2])
    p = pages.seat(p, pages.fits(p, take, b, limit), b, limit, jnp.array([False, False, True, True]), _prefill())
    table = np.asarray(p.cache.table)
    assert table[:, :2].tolist() == [[0, 1], [0, 1], [0, 1], [2, 3]]  # shard 1: prompt 0, then prompt 1
    keys = np.asarray(p.cache.pool.keys)[0, :, :, 0, 0]
    assert keys[0].tolist() == keys[L + 1].tolist() == [10, 11]  # prompt 0 on both shards' blocks
    assert keys[L + 1 + 2].tolist() == [20, 21]
    refs = np.asarray(p.refs)
    assert refs[0, :2].tolist() == [2, 2] and refs[1, :4].tolist() == [1, 1, 1, 1]
    p = pages.grow(p, jnp.ones((4,), bool), jnp.full((4,), 2))
    assert np.asarray(p.cache.table)[:, 2].tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"sampling.page_size": 64, "model.attention_impl": "flash"},
            "--config.sampling.page_size=64 with --config.model.attention_impl='flash'",
        ),
        (
            {"sampling.page_size": 64, "model.attention_impl": "splash"},
            "the TPU decode kernel reads a page as one block, a multiple of 128 entries",
        ),
        ({"sampling.kv_pages": 100}, "--config.sampling.kv_pages=100 sizes a paged KV cache: set sampling.page_size"),
        ({"sampling.page_size": 64}, "--config.sampling.page_size=64: every prompt bucket must be whole pages"),
    ],
)
def test_bad_page_settings_name_their_flags(overrides, message):
    from emor3_jax import config_lib
    from tests.sampling.test_int8_cache import _config

    with pytest.raises(ValueError) as err:
        config_lib.validate(_config(**overrides))
    assert message in str(err.value)
    good = {"sampling.page_size": 32, "sampling.kv_pages": 64, "model.attention_impl": "xla"}
    config_lib.validate(_config(**good))
