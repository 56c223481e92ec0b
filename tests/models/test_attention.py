"""Attention past QUERY_BLOCK queries runs block by block (layers.attention): the same outputs
and gradients as all queries at once (the dense mask of the same segments), for both XLA paths,
with a length that is not a multiple of the block (the padded queries are dropped) and packed
causal segments (two in one row)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.models.qwen25_vl import layers

B, T, N, K, H = 2, 10, 4, 2, 8


def _inputs():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32)
    seg = jnp.asarray([[1] * 6 + [2] * 4, [1] * 10], jnp.int32)
    return q, k, v, layers.Segments(seg, seg, causal=True)


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_query_blocks_give_the_same_outputs_and_gradients(impl):
    q, k, v, segments = _inputs()
    whole = lambda q, k, v: layers._attention(q, k, v, segments.mask(), impl)
    blocked = lambda q, k, v: layers.attention(q, k, v, segments, impl, block=4)  # 3 blocks, 2 padded queries
    np.testing.assert_allclose(blocked(q, k, v), whole(q, k, v), rtol=1e-6, atol=1e-6)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * jnp.arange(H))  # weights every output differently
    want = jax.grad(loss(whole), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_the_blocked_program_holds_one_block_of_scores():
    """The lowered program's largest score tensor is [B, N, block, S], not [B, N, T, S]."""
    q, k, v, segments = _inputs()
    text = jax.jit(lambda q: layers.attention(q, k, v, segments, "einsum", block=4)).lower(q).as_text()
    assert "2x2x2x4x10xf32" in text  # [B, K, G, block, S]
    assert "2x2x2x10x10xf32" not in text  # [B, K, G, T, S]
