"""LoRA adapters (models/lora.py) on the tiny preset: step 0 is the base model (logits identical
to the same seed at rank 0, images included), an adapted projection computes x W + b + x A B s
(against numpy), A is drawn as PEFT draws lora_A and B is zeros, the adapters shard on their
kernel's axes, and the two views of an adapted state: adapters off (the base exactly) and
merged (W + A B s, the adapted model's logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emor3_jax.core import sharding
from emor3_jax.models import lora
from emor3_jax.models.api import create_model, prepare_inputs, preset
from emor3_jax.models.qwen25_vl.layers import Linear

RULES = sharding.DEFAULT_RULES
ALL = tuple(lora.TARGETS)


def _cfg(rank: int = 0, param_dtype: str = "float32", targets=ALL):
    cfg = preset("tiny", vocab_size=96, param_dtype=param_dtype, compute_dtype="float32")
    return cfg.replace(lora_rank=rank, lora_alpha=16.0, lora_targets=targets)


def _mesh(devices: int = 1):
    return sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:devices])


def _inputs(cfg):
    """Two rows, the second around a 4 x 6-patch image (both vision adapters run)."""
    rng = np.random.default_rng(0)
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id]
    rows = [rng.integers(0, 80, 12).tolist(), rng.integers(0, 80, 2).tolist() + image + [5, 6]]
    ids = np.zeros((2, 12), np.int64)
    mask = np.zeros((2, 12), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    pixels = rng.standard_normal((24, cfg.vision.patch_dim)).astype(np.float32)
    out = prepare_inputs(cfg, ids, mask, pixel_values=pixels, image_grid_thw=np.array([[1, 4, 6]]))
    out.pop("rope_deltas")
    return out


@nnx.jit
def _logits(model, inputs):
    return model(**inputs)


def _with_b(params, seed: int = 1):
    """`params` with every lora_b drawn from N(0, 0.05): an adapted model that differs from its base."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))

    def draw(path, v):
        if path[-1] != "lora_b":
            return v
        return v.replace(0.05 * jax.random.normal(next(keys), v.shape, v.dtype))

    return nnx.from_flat_state([(p, draw(p, v)) for p, v in nnx.to_flat_state(params)])


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_step_0_with_lora_is_the_base_model(param_dtype):
    """Same seed, rank 8 on every target vs rank 0: the base weights are drawn alike (adapters are
    numbered after them) and B = 0 adds exactly nothing, so the logits are bit-identical."""
    mesh = _mesh()
    base = create_model(_cfg(0, param_dtype), mesh, RULES, seed=3)
    adapted = create_model(_cfg(8, param_dtype), mesh, RULES, seed=3)
    inputs = _inputs(base.cfg)
    np.testing.assert_array_equal(np.asarray(_logits(adapted, inputs)), np.asarray(_logits(base, inputs)))
    # the base weights themselves are the same arrays' values, in the base dtype
    base_flat = dict(nnx.to_flat_state(nnx.state(base)))
    for path, v in nnx.to_flat_state(nnx.state(adapted, lora.LoRAParam, ...)[1]):
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(base_flat[path].get_value()), str(path))
        assert v.get_value().dtype == jnp.dtype(param_dtype)


def test_an_adapted_projection_adds_x_a_b_times_alpha_over_rank():
    layer = Linear(
        6,
        5,
        ("embed", "mlp"),
        bias=True,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
        adapter=lora.Adapter(rank=3, scale=16.0 / 3),
    )
    rng = np.random.default_rng(0)
    layer.bias.set_value(jnp.asarray(rng.standard_normal(5), jnp.float32))
    layer.lora_b.set_value(jnp.asarray(rng.standard_normal((3, 5)), jnp.float32))
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    w, b, a, bb = (
        np.asarray(m.get_value(), np.float64) for m in (layer.kernel, layer.bias, layer.lora_a, layer.lora_b)
    )
    want = x @ w + b + (x @ a) @ bb * (16.0 / 3)  # a wrong scale (alpha, or 1) is off by ~5x
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_a_is_pefts_kaiming_uniform_b_is_zeros_both_fp32_under_a_bf16_base():
    model = create_model(_cfg(8, "bfloat16"), _mesh(), RULES, seed=0)
    adapters = dict(nnx.to_flat_state(nnx.state(model, lora.LoRAParam)))
    # text q/k/v/o + gate/up/down, vision qkv/proj + 3 mlp, merger fc1/fc2, lm_head
    assert len(adapters) == 2 * (7 + 5 + 2 + 1)
    a = np.asarray(adapters[("layers", "mlp", "down_proj", "lora_a")].get_value())  # [Y, F=256, r]
    bound = 1 / np.sqrt(256)  # kaiming_uniform(a=sqrt(5)) over fan_in = in; fan_in = r would give 0.35
    assert a.shape == (2, 256, 8) and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert not np.array_equal(a[0], a[1])  # each layer its own draw
    for path, v in adapters.items():
        assert v.get_value().dtype == jnp.float32, path
        if path[-1] == "lora_b":
            assert not np.asarray(v.get_value()).any(), path
    q = model.layers.self_attn.q_proj
    assert q.kernel.get_value().dtype == jnp.bfloat16
    assert q.lora_a.get_metadata()["scale"] == 2.0  # alpha 16 / rank 8


def test_only_the_targets_get_adapters():
    model = create_model(_cfg(4, targets=("mlp",)), _mesh(), RULES, seed=0)
    paths = {p[:-1] for p, _ in nnx.to_flat_state(nnx.state(model, lora.LoRAParam))}
    assert paths == {("layers", "mlp", n) for n in ("gate_proj", "up_proj", "down_proj")}


def test_adapters_shard_on_their_kernels_axes():
    """On 8 devices (fsdp = 8): A [Y, in, r] is split where its kernel's `in` axis is, B [Y, r, out]
    where its kernel's `out` axis is, r never."""
    model = create_model(_cfg(8), _mesh(8), RULES, seed=0)
    q = model.layers.self_attn.q_proj  # kernel [Y, embed, heads]: embed over fsdp
    o = model.layers.self_attn.o_proj  # kernel [Y, heads, embed]
    kernel_spec = lambda m: tuple(m.kernel.get_value().sharding.spec)
    assert kernel_spec(q)[1] == "fsdp" and kernel_spec(o)[2] == "fsdp"
    assert tuple(q.lora_a.get_value().sharding.spec) == (None, "fsdp", None)
    assert tuple(o.lora_b.get_value().sharding.spec) == (None, None, "fsdp")


def test_adapters_off_is_the_base_and_merged_is_the_adapted_model():
    mesh = _mesh()
    base = create_model(_cfg(0), mesh, RULES, seed=0)
    graphdef, params = nnx.split(create_model(_cfg(8), mesh, RULES, seed=0))
    params = _with_b(params)
    inputs = _inputs(base.cfg)
    want_base = np.asarray(_logits(base, inputs))
    adapted = np.asarray(_logits(nnx.merge(graphdef, params), inputs))
    assert np.abs(adapted - want_base).max() > 1e-2  # B != 0 changed the model
    off = lora.adapters_off(params)
    np.testing.assert_array_equal(np.asarray(_logits(nnx.merge(graphdef, off), inputs)), want_base)
    merged = jax.jit(lora.merged)(params)
    assert not any(
        np.asarray(v.get_value()).any() for _, v in nnx.to_flat_state(merged) if isinstance(v, lora.LoRAParam)
    )
    np.testing.assert_allclose(np.asarray(_logits(nnx.merge(graphdef, merged), inputs)), adapted, atol=2e-5)


def test_without_adapters_the_views_are_the_params():
    params = nnx.state(create_model(_cfg(0), _mesh(), RULES, seed=0))
    for view in (lora.adapters_off(params), lora.merged(params)):
        for (p, v), (q, w) in zip(nnx.to_flat_state(view), nnx.to_flat_state(params)):
            assert p == q and v.get_value() is w.get_value()


def test_a_hub_checkpoint_loads_under_adapters_drawn_as_create_model_draws_them(hf_tiny_dir, mesh1):
    """load_hf with LoRA: the hub weights as without it (logits identical at step 0), the adapters
    drawn from the seed as create_model draws them (the same A), and save_hf refuses the model
    rather than drop its adapters."""
    fp32 = dict(param_dtype="float32", compute_dtype="float32")
    from emor3_jax.models.api import load_hf, save_hf

    plain = load_hf(hf_tiny_dir, mesh1, RULES, **fp32)
    adapted = load_hf(hf_tiny_dir, mesh1, RULES, seed=5, lora_rank=4, lora_targets=ALL, **fp32)
    ids = np.arange(1, 13, dtype=np.int32).reshape(2, 6)
    positions = np.broadcast_to(np.arange(6, dtype=np.int32), (3, 2, 6))
    inputs = dict(input_ids=ids, positions=positions, attention_mask=np.ones_like(ids))
    np.testing.assert_array_equal(np.asarray(_logits(adapted, inputs)), np.asarray(_logits(plain, inputs)))
    drawn = create_model(adapted.cfg, mesh1, RULES, seed=5)
    a = lambda m: np.asarray(m.layers.self_attn.q_proj.lora_a.get_value())
    np.testing.assert_array_equal(a(adapted), a(drawn))
    with pytest.raises(ValueError, match="without LoRA adapters"):
        save_hf(adapted, "/tmp/unused")


def test_lm_head_is_refused_as_a_target_where_the_model_ties_it_to_the_embedding():
    with pytest.raises(ValueError, match="ties its lm_head to the token embedding"):
        _cfg(8, targets=("attention", "lm_head")).replace(tie_word_embeddings=True)
