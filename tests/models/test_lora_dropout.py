"""LoRA dropout (models/lora.py `Dropout`, PEFT's lora_dropout): an adapted projection drops out
its adapter's input alone, y = x W + b + (dropout(x) A) B s, with the mask its key draws; no
dropout (None) or rate 0 is the plain projection bit for bit; over many keys the adapter term's
mean is the undropped one (the 1 / (1 - p) scaling); and in a forward pass of the tiny model
every projection of every layer, chunk and logits piece draws with a key of its own."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emor3_jax.core import sharding
from emor3_jax.core.batches import SequenceBatch
from emor3_jax.models import lora
from emor3_jax.models.api import create_model, prepare_inputs, preset
from emor3_jax.models.qwen25_vl.layers import Linear
from emor3_jax.rl.learner import response_logprobs

SCALE = 16.0 / 3


def _layer(b_scale: float = 1.0) -> Linear:
    """An adapted [6 -> 5] projection with a bias and B drawn from N(0, b_scale^2)."""
    layer = Linear(
        6,
        5,
        ("embed", "mlp"),
        bias=True,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
        adapter=lora.Adapter(rank=3, scale=SCALE),
    )
    rng = np.random.default_rng(0)
    layer.bias.set_value(jnp.asarray(rng.standard_normal(5), jnp.float32))
    layer.lora_b.set_value(jnp.asarray(b_scale * rng.standard_normal((3, 5)), jnp.float32))
    return layer


X = np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)


def test_dropout_drops_the_adapters_input_alone():
    """x W + b + ((x * mask / (1 - p)) A) B s, mask the key's bernoulli draw over x [8, 6]: a
    dropped-out base term (x * mask in x W too) is off by about |x W|, an unscaled mask (no
    1 / (1 - p)) by 43% of the adapter term."""
    layer, p, key = _layer(), 0.3, jax.random.key(4)
    w, b, a, bb = (
        np.asarray(m.get_value(), np.float64) for m in (layer.kernel, layer.bias, layer.lora_a, layer.lora_b)
    )
    x = X.reshape(-1, 6)
    mask = np.asarray(jax.random.bernoulli(key, 1 - p, x.shape))
    assert 0 < mask.mean() < 1  # some of x dropped, some kept
    want = x @ w + b + ((x * mask / (1 - p)) @ a) @ bb * SCALE
    got = np.asarray(layer(jnp.asarray(X), lora.Dropout(key, p))).reshape(-1, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_no_dropout_and_rate_0_are_the_plain_projection_and_b_0_is_the_base():
    layer = _layer()
    plain = np.asarray(layer(jnp.asarray(X)))
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(X), None)), plain)
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(X), lora.Dropout(jax.random.key(0), 0.0))), plain)
    # B = 0: whatever the mask, the adapter adds nothing and the base term sees x itself
    zero_b = _layer(b_scale=0.0)
    base = np.asarray(zero_b(jnp.asarray(X)))
    np.testing.assert_array_equal(np.asarray(zero_b(jnp.asarray(X), lora.Dropout(jax.random.key(0), 0.5))), base)


def test_the_same_key_drops_the_same_and_another_key_otherwise():
    layer = _layer()
    run = lambda k: np.asarray(layer(jnp.asarray(X), lora.Dropout(jax.random.key(k), 0.3)))
    np.testing.assert_array_equal(run(1), run(1))
    assert np.abs(run(1) - run(2)).max() > 1e-3
    assert np.abs(run(1) - np.asarray(layer(jnp.asarray(X)))).max() > 1e-3


def test_over_many_keys_the_adapter_term_averages_to_the_undropped_one():
    """nn.Dropout's expectation is x, so E[(dropout(x) A) B s] = (x A) B s. 4,000 keys at p = 0.3:
    the mean is within 5 standard errors (measured from the draws) of it; a mask without the
    1 / (1 - p) scaling would average to 0.7 of it, over 5 standard errors off at most elements."""
    layer, p, n = _layer(), 0.3, 4000
    base = np.asarray(_layer(b_scale=0.0)(jnp.asarray(X)), np.float64)
    undropped = np.asarray(layer(jnp.asarray(X)), np.float64) - base
    keys = jax.random.split(jax.random.key(5), n)
    draws = np.asarray(jax.vmap(lambda k: layer(jnp.asarray(X), lora.Dropout(k, p)))(keys), np.float64) - base
    mean, se = draws.mean(axis=0), draws.std(axis=0) / np.sqrt(n)
    assert (np.abs(mean - undropped) < 5 * se + 1e-6).all(), np.abs(mean - undropped).max()
    assert (np.abs(0.7 * undropped - undropped) > 5 * se).mean() > 0.5  # unscaled: most elements fail


def _two_image_batch(cfg):
    """Two rows, each around a 4 x 4-patch image, vision bucket 16: the tower encodes them in two
    chunks (its lax.map path)."""
    rng = np.random.default_rng(0)
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    ids = np.asarray([rng.integers(0, 80, 3).tolist() + image + [5, 6, 7] for _ in range(2)], np.int64)
    pixels = rng.standard_normal((32, cfg.vision.patch_dim)).astype(np.float32)
    grids = np.array([[1, 4, 4], [1, 4, 4]])
    return SequenceBatch.from_inputs(prepare_inputs(cfg, ids, np.ones_like(ids), pixels, grids))


def test_every_projection_of_every_layer_chunk_and_logits_piece_draws_its_own_mask(monkeypatch):
    """A training forward (response_logprobs, logits in 3 pieces) of the tiny model with adapters
    on every target, the tower in 2 chunks: the key behind each mask, recorded as it is drawn,
    is a different one at each of 2 text layers x 7 projections, 2 chunks x (2 vision blocks x
    5 + the merger's 2) and 3 lm_head pieces (41 draws); handing every layer, chunk or
    projection the same key would repeat keys."""
    cfg = preset("tiny", vocab_size=96, compute_dtype="float32", vision_buckets=(16,))  # layers scanned
    cfg = cfg.replace(lora_rank=4, lora_targets=tuple(lora.TARGETS))
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:1])
    model = create_model(cfg, mesh, sharding.DEFAULT_RULES, seed=0)
    batch = _two_image_batch(cfg)
    assert batch.layout.windows.index.ndim == 3  # chunked
    drawn, drop = [], lora.drop

    def recording(x, d):
        jax.debug.callback(lambda k: drawn.append(tuple(np.asarray(k).tolist())), jax.random.key_data(d.key))
        return drop(x, d)

    monkeypatch.setattr(lora, "drop", recording)
    forward = nnx.jit(lambda m, b, k: response_logprobs(m, b, 0, 11, chunk=4, dropout=lora.Dropout(k, 0.2))[0])
    logp = forward(model, batch, jax.random.key(3))
    jax.block_until_ready(logp)
    assert np.isfinite(np.asarray(logp)).all()
    assert len(drawn) == 2 * 7 + 2 * (2 * 5 + 2) + 3
    assert len(set(drawn)) == len(drawn)
