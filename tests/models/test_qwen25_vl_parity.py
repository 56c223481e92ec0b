"""Our Flax Qwen2.5-VL against transformers' own model (tiny, random, fp32, eager attention).

Every input case of qwen_fixtures.CASES: position ids and rope deltas, then full logits.
Also the vision tower block by block, gradients of summed token log-probs, both attention
paths, and bf16 compute within a stated tolerance of fp32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen_fixtures import CASES, make_batch

from emor3_jax.models.qwen25_vl.model import prepare_inputs
from emor3_jax.models.qwen25_vl.rope import get_rope_index
from emor3_jax.models.qwen25_vl.vision import vision_layout


def _hf_positions(hf_model, batch):
    ids = torch.tensor(batch["input_ids"])
    tt = (ids == hf_model.config.image_token_id).long()
    grid = torch.tensor(batch["image_grid_thw"]) if "image_grid_thw" in batch else None
    pos, deltas = hf_model.model.get_rope_index(
        ids, image_grid_thw=grid, mm_token_type_ids=tt, attention_mask=torch.tensor(batch["attention_mask"])
    )
    return pos.numpy(), deltas.numpy()[:, 0]


def _hf_logits(hf_model, batch):
    ids = torch.tensor(batch["input_ids"])
    tt = (ids == hf_model.config.image_token_id).long()
    pos, _ = _hf_positions(hf_model, batch)
    kw = {}
    if "image_grid_thw" in batch:
        kw = dict(
            pixel_values=torch.tensor(batch["pixel_values"]), image_grid_thw=torch.tensor(batch["image_grid_thw"])
        )
    return hf_model(
        input_ids=ids,
        attention_mask=torch.tensor(batch["attention_mask"]),
        position_ids=torch.tensor(pos),
        mm_token_type_ids=tt,
        **kw,
    ).logits


def _batch(name, seed=0):
    rows, side = CASES[name]
    return make_batch(rows, np.random.default_rng(seed), side)


@nnx.jit
def _forward(model, inputs):
    return model(**inputs)


def _ours(model, batch):
    inputs = prepare_inputs(model.cfg, **batch)
    inputs.pop("rope_deltas")
    return np.asarray(_forward(model, inputs))


@pytest.mark.parametrize("name", list(CASES))
def test_position_ids_and_deltas_match_transformers(hf_tiny, ours_fp32, name):
    batch = _batch(name)
    ref_pos, ref_deltas = _hf_positions(hf_tiny, batch)
    pos, deltas = get_rope_index(
        batch["input_ids"], ours_fp32.cfg, batch["attention_mask"], batch.get("image_grid_thw")
    )
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    if "image_grid_thw" in batch:  # images really move the positions off the 1-D ramp
        assert not np.array_equal(pos[1], pos[2])


def test_video_position_ids_match_transformers(hf_tiny, ours_fp32):
    """Video grids (t > 1, temporal spacing by tokens_per_second * seconds per grid)."""
    cfg = ours_fp32.cfg
    ids = np.array(
        [
            [5, 6, cfg.vision_start_token_id]
            + [cfg.video_token_id] * (3 * 4 * 6 // 4)
            + [cfg.vision_end_token_id, 7, cfg.image_token_id, cfg.image_token_id, 8]
        ]
    )
    video_grid, image_grid, seconds = np.array([[3, 4, 6]]), np.array([[1, 2, 4]]), np.array([1.5])
    tt = torch.tensor((ids == cfg.image_token_id) + 2 * (ids == cfg.video_token_id)).long()
    ref_pos, ref_deltas = hf_tiny.model.get_rope_index(
        torch.tensor(ids),
        image_grid_thw=torch.tensor(image_grid),
        video_grid_thw=torch.tensor(video_grid),
        second_per_grid_ts=torch.tensor(seconds),
        mm_token_type_ids=tt,
        attention_mask=torch.ones(ids.shape),
    )
    pos, deltas = get_rope_index(ids, cfg, None, image_grid, video_grid, seconds)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy()[:, 0])


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(hf_tiny, ours_fp32, name):
    batch = _batch(name)
    with torch.no_grad():
        ref = _hf_logits(hf_tiny, batch).numpy()
    ours = _ours(ours_fp32, batch)
    real = batch["attention_mask"].astype(bool)  # padded positions are undefined in both
    assert np.abs(ours - ref)[real].max() <= 1e-4


def test_unrolled_layers_match_transformers(hf_tiny, hf_tiny_dir, mesh1, ours_fp32):
    """model.unroll_layers (the tiny CPU default): the same logits, from a program with no
    layer loop left in it (the scanned model's has one)."""
    from emor3_jax.core import sharding
    from emor3_jax.models.qwen25_vl.convert import load_hf

    model = load_hf(
        hf_tiny_dir, mesh1, sharding.DEFAULT_RULES, param_dtype="float32", compute_dtype="float32", unroll_layers=True
    )
    batch = _batch("mixed_batch")
    with torch.no_grad():
        ref = _hf_logits(hf_tiny, batch).numpy()
    real = batch["attention_mask"].astype(bool)
    assert np.abs(_ours(model, batch) - ref)[real].max() <= 1e-4
    inputs = prepare_inputs(model.cfg, **batch)
    inputs.pop("rope_deltas")
    graphdef, state = nnx.split(model)
    assert "while" not in jax.jit(lambda s: nnx.merge(graphdef, s)(**inputs)).lower(state).as_text()
    assert "while" in jax.jit(lambda s: nnx.merge(*nnx.split(ours_fp32)[:1], s)(**inputs)).lower(state).as_text()


def test_einsum_attention_path_matches_transformers(hf_tiny, hf_tiny_dir, mesh1):
    from emor3_jax.core import sharding
    from emor3_jax.models.qwen25_vl.convert import load_hf

    model = load_hf(
        hf_tiny_dir,
        mesh1,
        sharding.DEFAULT_RULES,
        param_dtype="float32",
        compute_dtype="float32",
        attention_impl="einsum",
    )
    batch = _batch("mixed_batch")
    with torch.no_grad():
        ref = _hf_logits(hf_tiny, batch).numpy()
    ours = _ours(model, batch)
    assert np.abs(ours - ref)[batch["attention_mask"].astype(bool)].max() <= 1e-4


def test_vision_tower_per_block_matches_transformers(hf_tiny, ours_fp32):
    batch = _batch("two_images_sizes")  # partial windows: 12x20 patches -> 2x3 windows
    grid = batch["image_grid_thw"]
    with torch.no_grad():
        ref = hf_tiny.model.visual(
            torch.tensor(batch["pixel_values"]), grid_thw=torch.tensor(grid), output_hidden_states=True
        )
    inputs = prepare_inputs(ours_fp32.cfg, **batch)
    layout = inputs["layout"]
    # 6 + 1 windows; the four partial ones (32, 32, 32, 16 patches) share rows: 5 rows of 64.
    assert layout.windows.index.shape == (5, 64) and np.unique(layout.windows.segment).tolist() == [-1, *range(7)]

    @nnx.jit
    def tower(model, pixels, layout):
        return model.visual(pixels, layout, return_blocks=True)

    merged, blocks = tower(ours_fp32, inputs["pixels"], layout)
    # transformers records the block input first, then each block's output (window order both).
    assert len(ref.hidden_states) == len(blocks) + 1
    for i, (ours_h, ref_h) in enumerate(zip(blocks, ref.hidden_states[1:])):
        err = np.abs(np.asarray(ours_h) - ref_h.numpy()).max()
        assert err <= 1e-5, f"block {i}: max abs diff {err}"
    final = np.asarray(merged)[layout.merged_image]
    assert np.abs(final - ref.pooler_output.numpy()).max() <= 1e-5


def test_vision_attention_memory_is_linear_in_windows_and_images(ours_fp32):
    """Window blocks gather [W, 64] windows, full blocks [F, Lf] frames: the largest attention
    operand grows with the number of windows / images, never with (all patches)^2."""
    cfg = ours_fp32.cfg.vision
    small = vision_layout(np.array([[1, 16, 16]]), None, cfg)
    large = vision_layout(np.array([[1, 64, 64]]), None, cfg)
    assert small.windows.index.shape == (4, 64) and large.windows.index.shape == (64, 64)
    # 16x more patches -> 16x more windows, each still 64 slots.
    assert large.windows.index.size / small.windows.index.size == large.patch_order.size / small.patch_order.size
    many = vision_layout(np.array([[1, 16, 16]] * 8 + [[1, 8, 12]]), None, cfg)
    assert many.frames.index.shape == (9, 256)  # 9 images -> 9 rows of the largest frame, not (8*256+96)^2
    assert sorted(many.frames.unblock.tolist()) == sorted(set(many.frames.unblock.tolist()))


def _token_logprob_sum(logits, ids, mask):
    """sum_t log p(ids[t+1] | <= t) over real next tokens."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return (picked * (mask[:, 1:] * mask[:, :-1])).sum()


def _grad_of(grads: dict, path: tuple) -> np.ndarray:
    """The gradient at `path`; an int in it picks that layer of a stacked parameter."""
    layer = [i for i, p in enumerate(path) if isinstance(p, int)]
    if not layer:
        return np.asarray(grads[path][...])
    i = layer[0]
    return np.asarray(grads[path[:i] + path[i + 1 :]][...])[path[i]]


GRAD_PARAMS = {  # hub key -> (our path, its layer if stacked; layout: linear weights are transposed)
    "model.visual.blocks.0.attn.qkv.weight": (("visual", "blocks", 0, "attn", "qkv", "kernel"), "T"),
    "model.visual.blocks.1.attn.qkv.bias": (("visual", "blocks", 1, "attn", "qkv", "bias"), ""),
    "model.visual.blocks.2.norm1.weight": (("visual", "blocks", 2, "norm1", "weight"), ""),
    "model.visual.patch_embed.proj.weight": (("visual", "patch_embed", "kernel"), "conv"),
    "model.visual.merger.mlp.0.weight": (("visual", "merger", "fc1", "kernel"), "T"),
    "model.visual.merger.ln_q.weight": (("visual", "merger", "ln_q", "weight"), ""),
    "model.language_model.layers.0.self_attn.q_proj.weight": (("layers", 0, "self_attn", "q_proj", "kernel"), "T"),
    "model.language_model.layers.1.self_attn.k_proj.bias": (("layers", 1, "self_attn", "k_proj", "bias"), ""),
    "model.language_model.layers.0.self_attn.v_proj.weight": (("layers", 0, "self_attn", "v_proj", "kernel"), "T"),
    "model.language_model.layers.1.self_attn.o_proj.weight": (("layers", 1, "self_attn", "o_proj", "kernel"), "T"),
    "model.language_model.layers.0.mlp.gate_proj.weight": (("layers", 0, "mlp", "gate_proj", "kernel"), "T"),
    "model.language_model.layers.1.mlp.down_proj.weight": (("layers", 1, "mlp", "down_proj", "kernel"), "T"),
    "model.language_model.layers.0.input_layernorm.weight": (("layers", 0, "input_layernorm", "weight"), ""),
    "model.language_model.norm.weight": (("norm", "weight"), ""),
    "model.language_model.embed_tokens.weight": (("embed_tokens",), ""),
    "lm_head.weight": (("lm_head", "kernel"), "T"),
}


@pytest.mark.parametrize("buckets", [(), (64, 256)], ids=["unpadded", "vision_buckets"])
def test_gradients_match_torch_autograd(hf_tiny, ours_fp32, buckets):
    """With buckets, our 172 patches are padded to 256 (transformers sees the 172): padding
    adds nothing to any gradient."""
    batch = _batch("mixed_batch")
    hf_tiny.zero_grad()
    logits = _hf_logits(hf_tiny, batch)
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"]).float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    (logp * mask[:, 1:] * mask[:, :-1]).sum().backward()
    ref_grads = dict(hf_tiny.named_parameters())

    inputs = prepare_inputs(ours_fp32.cfg.replace(vision_buckets=buckets), **batch)
    inputs.pop("rope_deltas")
    assert inputs["pixels"].shape[0] == (buckets[-1] if buckets else 172)

    @nnx.jit
    def grads(model, inputs):
        return nnx.grad(lambda m: _token_logprob_sum(m(**inputs), inputs["input_ids"], inputs["attention_mask"]))(model)

    g = {tuple(p): v for p, v in nnx.to_flat_state(grads(ours_fp32, inputs))}
    for hf_key, (path, layout) in GRAD_PARAMS.items():
        ref = ref_grads[hf_key].grad.numpy()
        ours = _grad_of(g, path)
        if layout == "T":
            ours = ours.T
        elif layout == "conv":
            ours = ours.T.reshape(ref.shape)
        scale = np.abs(ref).max()
        assert scale > 0, f"{hf_key}: zero reference gradient tests nothing"
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale, err_msg=hf_key)


@pytest.mark.parametrize("policy", ["nothing", "dots"])
def test_remat_gives_the_same_gradients(ours_fp32, policy):
    batch = _batch("one_image")
    inputs = prepare_inputs(ours_fp32.cfg, **batch)
    inputs.pop("rope_deltas")
    graphdef, state = nnx.split(ours_fp32)
    remat_def, _ = nnx.split(
        nnx.eval_shape(
            lambda: type(ours_fp32)(ours_fp32.cfg.replace(remat=True, remat_policy=policy), rngs=nnx.Rngs(0))
        )
    )

    def loss_of(gdef):
        return lambda s: _token_logprob_sum(nnx.merge(gdef, s)(**inputs), inputs["input_ids"], inputs["attention_mask"])

    def grads(gdef):
        return jax.jit(jax.grad(loss_of(gdef)))(state)

    plain, remat = grads(graphdef), grads(remat_def)
    # Saving the matmuls' outputs lets XLA fuse the recomputed rest in another order: one
    # element in 25,600 was seen 1.07e-6 off.
    atol = {"nothing": 1e-6, "dots": 2e-6}[policy]
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)
    # The scanned decoder layer and the scanned vision block are rematerialised: one checkpoint
    # each, inside the two scans.
    jaxpr = str(jax.make_jaxpr(loss_of(remat_def))(state))
    assert jaxpr.count(" = remat") == 2 and jaxpr.count(" = scan") == 2
    shown = {"nothing": "policy=<function nothing_saveable ", "dots": "policy=DotsSaveable(only_if_no_batch_dims=True)"}
    assert jaxpr.count(shown[policy]) == 2  # the policy asked for (as jax prints it)


def test_bf16_compute_stays_close_to_fp32(hf_tiny_dir, mesh1, ours_fp32):
    """bf16 compute (fp32 params): logits within 0.05 of fp32, on logits of magnitude ~1-4."""
    from emor3_jax.core import sharding
    from emor3_jax.models.qwen25_vl.convert import load_hf

    bf16 = load_hf(hf_tiny_dir, mesh1, sharding.DEFAULT_RULES, param_dtype="float32", compute_dtype="bfloat16")
    batch = _batch("mixed_batch")
    real = batch["attention_mask"].astype(bool)
    ref, ours = _ours(ours_fp32, batch), _ours(bf16, batch)
    err = np.abs(ours - ref)[real]
    assert 0 < err.max() <= 0.05, f"bf16 max abs diff {err.max()}"
    assert err.mean() <= 0.01
    # The argmax token rarely changes.
    assert (ours.argmax(-1) == ref.argmax(-1))[real].mean() >= 0.95
