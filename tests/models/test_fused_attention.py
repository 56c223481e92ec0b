"""The fused kernels (fused_attention: splash, flash; Pallas interpret mode on CPU) against the
XLA path with the dense mask of the same segment ids: outputs and gradients wrt q, k, v, on
packed rows, left-padded rows and vision-like blocks, grouped heads (N=4, K=2), fp32; then
under an 8-device mesh, and compiled for a TPU from this host. Then the tiny model through
each kernel: logits against transformers (images: the vision tower through the kernel too),
packed-row log-probs and gradients and the sampler's prefill against XLA.

Every position is compared, padding too: padding attends to padding in every path (and the
positions a kernel adds to fill its blocks attend only to each other), so no path has an
empty softmax whose output would be arbitrary.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.core import sharding
from emor3_jax.models.qwen25_vl import fused_attention, layers

N, K = 4, 2
TOL = 1e-5

# name -> (segment ids per row, causal, head dim)
CASES = {
    # three and two segments of odd lengths, trailing padding (rl/packing's rows)
    "packed": ([[1] * 5 + [2] * 7 + [3] * 4 + [0] * 3, [1] * 11 + [2] * 6 + [0] * 2], True, 8),
    # the sampler's prefill: left padding, then one prompt
    "left_padded": ([[0] * 6 + [1] * 13, [1] * 19], True, 8),
    # vision blocks: windows of a row attend within themselves, empty slots are 0; a head dim
    # that is not a power of two (the 3b tower's is 80)
    "vision_blocks": ([[1] * 7 + [2] * 5 + [3] * 6 + [0] * 2, [4] * 9 + [5] * 11], False, 20),
}


def _inputs(seg, h, seed=0):
    b, t = len(seg), len(seg[0])
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, N, h), jnp.float32)
    k = jax.random.normal(kk, (b, t, K, h), jnp.float32)
    v = jax.random.normal(kv, (b, t, K, h), jnp.float32)
    w = jax.random.normal(kw, (b, t, N, h), jnp.float32)  # weights every output differently
    ids = jnp.asarray(seg, jnp.int32)
    return (q, k, v), w, ids


def _value_and_grads(impl, qkv, w, segments):
    loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, segments, impl) * w)
    out = jax.jit(lambda q, k, v: layers.attention(q, k, v, segments, impl))(*qkv)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*qkv)


def _max_diffs(impl, seg, causal, h):
    qkv, w, ids = _inputs(seg, h)
    segments = layers.Segments(ids, ids, causal=causal)
    want, want_g = _value_and_grads("xla", qkv, w, segments)
    got, got_g = _value_and_grads(impl, qkv, w, segments)
    return [float(jnp.abs(a - b).max()) for a, b in zip((got, *got_g), (want, *want_g))]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", fused_attention.IMPLS)
def test_kernel_matches_xla_outputs_and_gradients(impl, case):
    start = time.perf_counter()
    diffs = _max_diffs(impl, *CASES[case])
    print(f"{impl} {case}: max abs diff out/dq/dk/dv {diffs} ({time.perf_counter() - start:.1f} s)")
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("impl", fused_attention.IMPLS)
def test_kernel_sees_the_segments(impl):
    """The comparison above can fail: the kernel given the ids of another packing (two rows'
    segments swapped at one boundary) is far from the XLA path on the original ids."""
    seg, causal, h = CASES["packed"]
    qkv, w, ids = _inputs(seg, h)
    moved = ids.at[0, 5].set(1)  # the second segment's first token joins the first
    want = layers.attention(*qkv, layers.Segments(ids, ids, causal=causal), "xla")
    got = layers.attention(*qkv, layers.Segments(moved, moved, causal=causal), impl)
    assert float(jnp.abs(got - want).max()) > 0.1


@pytest.mark.parametrize("impl", fused_attention.IMPLS)
def test_kernel_under_a_mesh_runs_per_shard(impl):
    """Under an 8-device mesh (data 2 x fsdp 2 x tensor 2) the kernel runs on each device's
    rows and heads (shard_map: the Pallas call sees [B/4, T, N/2, H]) with the same outputs
    and gradients as the XLA path."""
    seg, causal, h = CASES["packed"]
    seg = seg + seg[::-1]  # 4 rows: one per data x fsdp shard
    qkv, w, ids = _inputs(seg, h)
    segments = layers.Segments(ids, ids, causal=causal)
    want, want_g = _value_and_grads("xla", qkv, w, segments)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        got, got_g = _value_and_grads(impl, qkv, w, segments)
        text = jax.jit(lambda q, k, v: layers.attention(q, k, v, segments, impl)).lower(*qkv).as_text()
    assert "manual_computation" in text and f"tensor<1x19x2x{h}xf32>" in text  # one row, two heads
    for a, b in zip((got, *got_g), (want, *want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)


def test_a_kernel_off_its_platform_is_refused(monkeypatch):
    qkv, _, ids = _inputs(CASES["packed"][0], 8)
    monkeypatch.setattr(fused_attention.sharding, "platform", lambda: "gpu")
    with pytest.raises(ValueError, match="attention_impl='splash' runs on tpu or cpu"):
        layers.attention(*qkv, layers.Segments(ids, ids, causal=True), "splash")


def _model_with(model, impl: str):
    """`model`'s parameters under another attention_impl."""
    from flax import nnx

    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: type(model)(model.cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0)))
    )
    return nnx.merge(graphdef, nnx.split(model)[1])


@pytest.mark.parametrize("impl", fused_attention.IMPLS)
def test_model_logits_match_transformers(hf_tiny, ours_fp32, impl):
    """The tiny model through the kernel (decoder, and the vision tower's window and full
    attention: three rows, three images, left padding) against transformers' eager logits."""
    from flax import nnx
    from qwen_fixtures import CASES as BATCHES
    from qwen_fixtures import hf_forward, make_batch

    from emor3_jax.models.qwen25_vl.model import prepare_inputs

    rows, side = BATCHES["mixed_batch"]
    batch = make_batch(rows, np.random.default_rng(0), side)
    ref, _, _ = hf_forward(hf_tiny, batch)
    inputs = prepare_inputs(ours_fp32.cfg, **batch)
    inputs.pop("rope_deltas")
    model = _model_with(ours_fp32, impl)
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(**inputs))(state))
    assert jaxpr.count("pallas_call") == 3  # the scanned decoder layer, the tower's window and full blocks
    start = time.perf_counter()
    logits = np.asarray(nnx.jit(lambda m, x: m(**x))(model, inputs))
    real = batch["attention_mask"].astype(bool)  # padded positions are undefined in transformers
    err = np.abs(logits - ref)[real].max()
    print(f"{impl}: logits max abs diff vs transformers {err:.2e} ({time.perf_counter() - start:.1f} s)")
    assert err <= 1e-4


def _packed_rows():
    """Two packed rows of 23 tokens: segments of 6, 9 and 5 then 3 padding; 14 and 9."""
    seg = np.array([[1] * 6 + [2] * 9 + [3] * 5 + [0] * 3, [1] * 14 + [2] * 9], np.int32)
    pos = np.zeros(seg.shape, np.int32)
    for r, row in enumerate(seg):
        for s in set(row.tolist()) - {0}:
            pos[r, row == s] = np.arange((row == s).sum())  # each segment's positions restart at 0
    ids = np.random.default_rng(1).integers(0, 380, seg.shape).astype(np.int32) * (seg > 0)
    return ids, np.broadcast_to(pos, (3, *seg.shape)).copy(), seg


def _packed_logprob_sum(model):
    """Summed log-probs of each next token within its segment of `_packed_rows`, through the
    learner's packed path (hidden_states(..., segment_ids))."""
    ids, pos, seg = _packed_rows()
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    h = model.hidden_states(model.embed(ids), pos, (seg > 0).astype(np.int32), seg)
    logp = jax.nn.log_softmax(model.logits(h[:, :-1]), axis=-1)
    return (jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0] * same).sum()


@pytest.fixture(scope="module")
def packed_xla(ours_fp32):
    """The XLA path's packed log-prob sum and its parameter gradients (shared by both kernels)."""
    from flax import nnx

    return nnx.jit(nnx.value_and_grad(_packed_logprob_sum))(ours_fp32)


@pytest.mark.parametrize("impl", fused_attention.IMPLS)
def test_packed_logprobs_and_gradients_match_xla(ours_fp32, packed_xla, impl):
    """The packed log-prob sum and its gradient wrt every parameter through the kernel."""
    from flax import nnx

    want, want_g = packed_xla
    start = time.perf_counter()
    got, got_g = nnx.jit(nnx.value_and_grad(_packed_logprob_sum))(_model_with(ours_fp32, impl))
    grad_err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)))
    print(
        f"{impl}: log-prob sum {float(got):.6f} vs {float(want):.6f}, gradients max abs diff {grad_err:.2e} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    assert abs(float(got) - float(want)) <= 1e-4 and grad_err <= 1e-5


@pytest.mark.parametrize("h", [128, 80], ids=["text_head_dim", "3b_vision_head_dim"])
def test_splash_compiles_for_a_tpu_from_this_host(h):
    """Under a mesh of compile-only v5p devices (compile_for's case: a TPU program built on a
    CPU host) splash is the Mosaic kernel, not interpret mode, and lowers for the 3b/7b text
    head dim (128) and the 3b vision tower's (80), bf16, forward and backward, per fsdp shard."""
    pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu")
    from emor3_jax import compile_for

    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], compile_for.topology_devices("v5p:2x2x1"))
    b, t, n, k = 4, 640, 16, 2  # 640: five 128-blocks
    rules = sharding.DEFAULT_RULES
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.named_sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules)
    )

    def loss(q, k, v, ids):
        out = layers.attention(q, k, v, layers.Segments(ids, ids, causal=True), "splash")
        return out.astype(jnp.float32).sum()

    # conftest's "highest" matmul precision would ask Mosaic for an fp32 contraction of bf16
    # operands, which it refuses ("Bad lhs type"); runs keep the default.
    with sharding.use_mesh(mesh, rules), jax.default_matmul_precision("default"):
        args = (spec(b, t, n, h), spec(b, t, k, h), spec(b, t, k, h), spec(b, t, dtype=jnp.int32))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 3  # forward, dq, dkv kernels


@pytest.mark.parametrize("impl", fused_attention.IMPLS)
def test_sampler_prefill_through_the_kernel_matches_xla(ours_fp32, impl):
    """The sampler's prefill (left-padded prompts, one with an image: Segments 0/1, causal):
    the next-token logits and the prompt cache it hands to decode, kernel against XLA."""
    from flax import nnx
    from qwen_fixtures import make_batch

    from emor3_jax.models.qwen25_vl.model import prepare_inputs
    from emor3_jax.sampling.sampler import _prefill

    batch = make_batch([[5, ("image", 8, 8), 6], [9]], np.random.default_rng(2), "left")
    inputs = prepare_inputs(ours_fp32.cfg, **batch)
    inputs["next_pos"] = inputs.pop("rope_deltas")  # carried through as is; any [B] ints
    prefill = jax.jit(functools.partial(_prefill, kv_dtype=""), static_argnums=(0,))
    want = prefill(*nnx.split(ours_fp32), inputs)
    got = prefill(*nnx.split(_model_with(ours_fp32, impl)), inputs)
    real = batch["attention_mask"].astype(bool)  # cache entries of padding are never live in decode
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got.start), np.asarray(want.start))
    for g, w in zip(jax.tree.leaves(got.cache), jax.tree.leaves(want.cache)):  # keys and values [Y, B, P, K, H]
        np.testing.assert_allclose(np.asarray(g)[:, real], np.asarray(w)[:, real], atol=1e-5, rtol=0)
