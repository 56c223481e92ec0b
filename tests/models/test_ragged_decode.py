"""Decode attention over each row's live span [start, end) (ragged_decode.py): the "xla" reference
against a numpy softmax; the "tpu" kernel (TPU interpret mode) and jax's "gpu" kernel (interpret
mode) against "xla" for spans at the start, middle and end of the cache, of length 1, full, on and
off block boundaries, G = 1 and 4, different spans per row; dead entries filled with garbage leave
the result unchanged; the tpu kernel's K/V bytes scale with the live length."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.models.qwen25_vl import ragged_decode as rd
from emor3_jax.models.qwen25_vl.ragged_decode import ragged_decode_attention

K, S, H = 2, 512, 32
TPU_BLOCK = 128  # 4 blocks per row
# Three rows per call, each with its own span.
SPANS = {
    "start_middle_end": [(0, 37), (150, 333), (400, 512)],  # none on a block boundary
    "full_one_aligned": [(0, 512), (200, 201), (128, 384)],
    "edges_and_straddle": [(511, 512), (0, 1), (127, 129)],  # length 1 at both ends; across a boundary
}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # bf16: a few output ulps at |o| ~ 1 (2**-8 each)


def _inputs(spans, g, dtype, seed=0):
    """q [B, K*G, H], k / v [B, S, K, H] standard normal; start / end [B] int32."""
    rng = np.random.default_rng(seed)
    b = len(spans)
    q = rng.standard_normal((b, K * g, H))
    k, v = rng.standard_normal((2, b, S, K, H))
    start, end = (jnp.asarray(x, jnp.int32) for x in zip(*spans))
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), start, end


def _block(impl):
    return TPU_BLOCK if impl == "tpu" else None


def _numpy_reference(q, k, v, start, end):
    """Row by row, head by head: softmax(q . k[start:end] / sqrt(H)) @ v[start:end] in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, n, h))
    for row in range(b):
        lo, hi = int(start[row]), int(end[row])
        for head in range(n):
            keys, values = k[row, lo:hi, head // g], v[row, lo:hi, head // g]
            logits = keys @ q[row, head] / np.sqrt(h)
            p = np.exp(logits - logits.max())
            out[row, head] = (p / p.sum()) @ values
    return out


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("spans", SPANS)
def test_xla_matches_a_numpy_softmax_over_the_span(spans, g):
    q, k, v, start, end = _inputs(SPANS[spans], g, jnp.float32)
    got = ragged_decode_attention(q, k, v, start, end, impl="xla")
    np.testing.assert_allclose(got, _numpy_reference(q, k, v, start, end), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("spans", SPANS)
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_kernel_matches_xla(impl, spans, g):
    q, k, v, start, end = _inputs(SPANS[spans], g, jnp.float32)
    want = ragged_decode_attention(q, k, v, start, end, impl="xla")
    got = ragged_decode_attention(q, k, v, start, end, impl=impl, block=_block(impl))
    assert got.shape == (3, K * g, H) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=TOL[jnp.float32], rtol=0)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_kernel_matches_xla_in_bf16(impl):
    q, k, v, start, end = _inputs(SPANS["start_middle_end"], 4, jnp.bfloat16)
    want = ragged_decode_attention(q, k, v, start, end, impl="xla")
    got = ragged_decode_attention(q, k, v, start, end, impl=impl, block=_block(impl))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=TOL[jnp.bfloat16], rtol=0)


# jax's gpu kernel masks by adding 0.7 * finfo.min to logits it has read, so a NaN in a dead
# entry of a split that overlaps the span reaches the result (documented in ragged_decode); it
# gets huge finite garbage only. The other two never let a dead value into the arithmetic.
@pytest.mark.parametrize(
    ("impl", "garbage"), [("xla", np.nan), ("xla", 1e30), ("tpu", np.nan), ("tpu", -1e30), ("gpu", 1e30)]
)
def test_garbage_in_dead_entries_does_not_change_the_result(impl, garbage):
    spans = SPANS["start_middle_end"]
    q, k, v, start, end = _inputs(spans, 4, jnp.float32)
    pos = np.arange(S)
    dead = np.stack([(pos < lo) | (pos >= hi) for lo, hi in spans])[:, :, None, None]  # [B, S, 1, 1]
    k_bad, v_bad = (jnp.where(dead, garbage, x) for x in (k, v))
    run = functools.partial(ragged_decode_attention, start=start, end=end, impl=impl, block=_block(impl))
    clean, dirty = run(q, k, v), run(q, k_bad, v_bad)
    assert np.isfinite(dirty).all()
    np.testing.assert_allclose(dirty, clean, atol=1e-6, rtol=0)


def test_kernel_configuration_errors_name_the_constraint():
    q, k, v, start, end = _inputs(SPANS["full_one_aligned"], 1, jnp.float32)
    with pytest.raises(ValueError, match="block % 128 == 0 and S % block == 0"):
        ragged_decode_attention(q, k, v, start, end, impl="tpu", block=96)
    with pytest.raises(ValueError, match="block % 128 == 0 and S % block == 0"):
        ragged_decode_attention(q, k, v, start, end, impl="tpu", block=384)  # 512 % 384
    with pytest.raises(ValueError, match="S % 16 == 0"):
        ragged_decode_attention(q, k[:, :40], v[:, :40], start, end, impl="gpu")
    with pytest.raises(ValueError, match="power-of-two head dim"):
        ragged_decode_attention(q[..., :24], k[..., :24], v[..., :24], start, end, impl="gpu")
    with pytest.raises(ValueError, match=r"block_k must be a power of two >= 16 dividing S // k_splits = 512 // 16"):
        ragged_decode_attention(q, k, v, start, end, impl="gpu", block=64)
    with pytest.raises(ValueError, match="takes no block"):
        ragged_decode_attention(q, k, v, start, end, impl="xla", block=128)
    with pytest.raises(ValueError, match="dtypes"):
        ragged_decode_attention(q, k.astype(jnp.bfloat16), v, start, end, impl="xla")


def test_gpu_parameters_follow_the_cache_length():
    assert rd.gpu_params(4096, 128, None) == (16, 128)  # jax's defaults, parts of 256
    assert rd.gpu_params(512, 32, None) == (16, 32)  # parts of 32
    assert rd.gpu_params(48, 32, None) == (1, 16)  # 48 = 3 * 16: one part of 48, walked by 16


def test_tpu_default_block_is_the_largest_lane_multiple_up_to_512_dividing_s():
    assert [rd.tpu_block(s, None) for s in (4096, 384, 640)] == [512, 384, 128]


def test_live_blocks_counted_by_hand():
    """S = 4096, block = 512 (8 blocks): the blocks a span touches."""
    start = np.array([0, 100, 4095, 0, 511, 512])
    end = np.array([1024, 1124, 4096, 4096, 513, 1024])
    # [0, 1024): blocks 0-1; [100, 1124): 0-2; last entry: block 7; full: 0-7; [511, 513): 0-1; [512, 1024): 1
    np.testing.assert_array_equal(rd.live_blocks(start, end, 4096, 512), [2, 3, 1, 8, 2, 1])


def _spans_3b(fill, aligned, rows=256, s=4096, seed=0):
    """end - start = fill * S for every row; start 0 (aligned) or uniform over the valid starts."""
    length = int(fill * s)
    start = np.zeros(rows, int) if aligned else np.random.default_rng(seed).integers(0, s - length + 1, rows)
    return start, start + length


@pytest.mark.parametrize("block", [128, 256, 512])
def test_bytes_read_scales_with_the_live_length(block):
    """3b decode shapes (K = 2, H = 128, S = 4096, bf16, B = 256): 25% fill reads < 0.3 x a full
    cache when spans start on a block; from anywhere, at most one extra block per row."""
    size = functools.partial(rd.bytes_read, s=4096, block=block, kv_heads=2, head_dim=128, itemsize=2)
    full = size(*_spans_3b(1.0, True))
    assert full == 256 * 2 * 4096 * 128 * 2 * 2  # the whole cache, keys and values
    assert size(*_spans_3b(0.25, True)) < 0.3 * full
    assert size(*_spans_3b(0.25, False)) <= (0.25 + block / 4096) * full


@pytest.mark.parametrize("g", [8, 7])  # 3b and 7b query heads per kv head
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernel_lowers_to_mosaic_at_3b_shapes(dtype, g):
    """Pallas -> Mosaic lowering on CPU (compiling it needs a TPU): catches ops without a TPU rule."""
    b, s, h = 4, 4096, 128
    args = [jax.ShapeDtypeStruct((b, K * g, h), dtype)] + [jax.ShapeDtypeStruct((b, s, K, h), dtype)] * 2
    args += [jax.ShapeDtypeStruct((b,), jnp.int32)] * 2
    f = jax.jit(functools.partial(ragged_decode_attention, impl="tpu", interpret=False))
    assert "tpu_custom_call" in f.trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_sharded_kernel_runs_on_each_devices_rows_and_heads(impl):
    """Under an 8-device mesh (data 2 x fsdp 2 x tensor 2) the kernel sees its device's rows and
    kv heads ([B/4, S, K/2, H]: one row, one kv head) and gives the unsharded reference."""
    from emor3_jax.core import sharding

    spans = SPANS["start_middle_end"] + [(5, 300)]  # 4 rows: one per data x fsdp shard
    q, k, v, start, end = _inputs(spans, 4, jnp.float32)
    want = ragged_decode_attention(q, k, v, start, end, impl="xla")
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    run = jax.jit(functools.partial(rd.sharded_decode_attention, impl=impl))
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        got = run(q, k, v, start, end)
        text = run.lower(q, k, v, start, end).as_text()
    assert "manual_computation" in text and f"tensor<1x{S}x1x{H}xf32>" in text
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL[jnp.float32], rtol=0)


def _paged(rows, page, rng, spare=3):
    """A table [B, S / page] of shuffled page ids for `rows` rows, and the pool's page count
    (`spare` pages more, which no row uses)."""
    mp = S // page
    return rng.permutation(rows * mp + spare)[: rows * mp].reshape(rows, mp), rows * mp + spare


def _to_pool(x, table, n_pages, scales=False):
    """x [B, S, ...] (scales: [B, K, S]) -> a pool of n_pages pages [n_pages, page, ...] ([n_pages,
    K, page]) laid out by table; unused pages hold NaN (float) or 7 (int8)."""
    b, mp = table.shape
    if scales:
        rows = x.reshape(b, x.shape[1], mp, -1).swapaxes(1, 2).reshape(b * mp, x.shape[1], -1)
    else:
        rows = x.reshape(b * mp, -1, *x.shape[2:])
    pool = jnp.full((n_pages, *rows.shape[1:]), jnp.nan if x.dtype == jnp.float32 else 7, x.dtype)
    return pool.at[table.reshape(-1)].set(rows)


@pytest.mark.parametrize("impl", ["xla", "tpu"])
@pytest.mark.parametrize("g", [1, 4])
def test_a_paged_cache_read_through_its_table_gives_the_dense_result(impl, g):
    """Each row's pages scattered over a pool with NaN spares, rows' spans on and off page
    boundaries: the same output as the dense cache, and the gpu kernel refuses a table."""
    spans = SPANS["start_middle_end"] + SPANS["edges_and_straddle"]
    q, k, v, start, end = _inputs(spans, g, jnp.float32)
    want = ragged_decode_attention(q, k, v, start, end, impl="xla")
    rng = np.random.default_rng(1)
    table, pages = _paged(k.shape[0], TPU_BLOCK, rng)
    pool_k, pool_v = _to_pool(k, table, pages), _to_pool(v, table, pages)
    got = ragged_decode_attention(q, pool_k, pool_v, start, end, impl=impl, pages=jnp.asarray(table, jnp.int32))
    np.testing.assert_allclose(got, want, atol=TOL[jnp.float32], rtol=0)
    with pytest.raises(ValueError, match="paged"):
        ragged_decode_attention(q, pool_k, pool_v, start, end, impl="gpu", pages=jnp.asarray(table, jnp.int32))


@pytest.mark.parametrize("impl", ["xla", "tpu"])
def test_a_paged_int8_cache_gives_the_dense_int8_result(impl):
    """The int8 pool and its scales [pages, K, page] paged alike give the dense int8 output."""
    from emor3_jax.models.qwen25_vl import kv_cache

    q, k, v, start, end = _inputs(SPANS["start_middle_end"], 4, jnp.float32)
    (kq, ks), (vq, vs) = kv_cache.quantize(k), kv_cache.quantize(v)
    b = k.shape[0]
    kq, vq, ks, vs = kq.reshape(b, S, K * H), vq.reshape(b, S, K * H), ks.swapaxes(1, 2), vs.swapaxes(1, 2)
    want = ragged_decode_attention(q, kq, vq, start, end, impl="xla", k_scale=ks, v_scale=vs)
    table, pages = _paged(b, TPU_BLOCK, np.random.default_rng(2))
    pools = [_to_pool(x, table, pages) for x in (kq, vq)] + [_to_pool(x, table, pages, scales=True) for x in (ks, vs)]
    got = ragged_decode_attention(
        q, pools[0], pools[1], start, end, impl=impl, k_scale=pools[2], v_scale=pools[3], pages=jnp.asarray(table)
    )
    np.testing.assert_allclose(got, want, atol=TOL[jnp.float32], rtol=0)
