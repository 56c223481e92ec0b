"""The model sharded over 8 fake CPU devices: same logits as 1 device, parameters placed as the
rules say; plus the rule resolution itself."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from qwen_fixtures import CASES, make_batch

from emor3_jax.core import sharding
from emor3_jax.models.qwen25_vl.convert import load_hf
from emor3_jax.models.qwen25_vl.model import prepare_inputs

RULES = sharding.DEFAULT_RULES
FP32 = dict(param_dtype="float32", compute_dtype="float32")


def test_eight_fake_devices_are_present():
    assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"


def _logits(model, mesh, batch):
    inputs = prepare_inputs(model.cfg, **batch)
    inputs.pop("rope_deltas")
    with sharding.use_mesh(mesh, RULES):
        return np.asarray(nnx.jit(lambda m, x: m(**x))(model, inputs))


# Hand-written expectations: param path -> spec for (fsdp=4, tensor=2) and (fsdp=8). The
# decoder layers and vision blocks are stacked: their leading layer axis stays whole.
EXPECTED = {
    ("embed_tokens",): (P("tensor", "fsdp"), P(None, "fsdp")),  # [vocab 400, embed 64]
    ("layers", "self_attn", "q_proj", "kernel"): (P(None, "fsdp", "tensor"), P(None, "fsdp", None)),  # [2, 64, 64]
    ("layers", "self_attn", "k_proj", "bias"): (P(None, "tensor"), P(None, None)),  # [2, 32]
    ("layers", "self_attn", "o_proj", "kernel"): (P(None, "tensor", "fsdp"), P(None, None, "fsdp")),
    ("layers", "mlp", "down_proj", "kernel"): (P(None, "tensor", "fsdp"), P(None, None, "fsdp")),  # [2, 88, 64]
    ("layers", "input_layernorm", "weight"): (P(None, None), P(None, None)),
    ("lm_head", "kernel"): (P("fsdp", "tensor"), P("fsdp", None)),  # [64, 400]
    ("visual", "patch_embed", "kernel"): (P(None, "fsdp"), P(None, "fsdp")),  # [1176, 40]
    ("visual", "blocks", "attn", "qkv", "kernel"): (P(None, "fsdp", "tensor"), P(None, "fsdp", None)),  # [3, 40, 120]
    # [160, 64]: vision_embed and embed both map to fsdp; an axis shards one dim only.
    ("visual", "merger", "fc2", "kernel"): (P("fsdp", None), P("fsdp", None)),
}


@pytest.mark.parametrize("shape, which", [((1, 4, 2), 0), ((1, 8, 1), 1)], ids=["fsdp4_tensor2", "fsdp8"])
def test_sharded_model_matches_one_device_and_follows_the_rules(hf_tiny_dir, ours_fp32, mesh1, shape, which):
    mesh = sharding.make_mesh(list(zip(sharding.MESH_AXES, shape)))
    model = load_hf(hf_tiny_dir, mesh, RULES, **FP32)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, specs in EXPECTED.items():
        arr = flat[path][...]
        assert arr.sharding.spec == specs[which], f"{path}: {arr.sharding.spec}"
        n = np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(specs[which])) if a])
        assert arr.addressable_shards[0].data.size * n == arr.size  # really split, not replicated
    for path, v in flat.items():  # and every parameter as the rules resolve it
        spec, _ = sharding.logical_to_spec(v.get_metadata()["axes"], v.shape, mesh, RULES)
        assert v[...].sharding.spec == spec, path
    batch = make_batch(*CASES["mixed_batch"][:1], np.random.default_rng(0))
    real = batch["attention_mask"].astype(bool)
    ref = _logits(ours_fp32, mesh1, batch)
    np.testing.assert_allclose(_logits(model, mesh, batch)[real], ref[real], atol=1e-5)


def test_rules_replicate_an_indivisible_dim_and_say_so():
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 4), ("tensor", 2)])
    spec, fallbacks = sharding.logical_to_spec(("embed", "mlp"), (6, 10), mesh, RULES)
    assert spec == P(None, "tensor")
    assert fallbacks == ["embed=6 not divisible by fsdp=4"]


def test_a_mesh_axis_is_used_once_per_array():
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 8), ("tensor", 1)])
    spec, _ = sharding.logical_to_spec(
        ("vision_mlp", "vision_embed"), (16, 16), mesh, (("vision_mlp", "fsdp"), ("vision_embed", "fsdp"))
    )
    assert spec == P("fsdp", None)


@pytest.mark.parametrize(
    "shape, message",
    [
        ([("data", 1), ("fsdp", 3), ("tensor", 1)], "needs 3 devices, have 8"),
        ([("data", -1), ("fsdp", -1), ("tensor", 1)], "at most one -1"),
        ([("fsdp", -1), ("data", 1), ("tensor", 1)], "mesh axes must be"),
        ([("data", 1), ("fsdp", -1), ("tensor", 3)], "not divisible by 3"),
    ],
)
def test_bad_mesh_shapes_are_refused(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


def test_unknown_logical_axis_is_an_error():
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
    with pytest.raises(KeyError, match="'experts' has no rule"):
        sharding.logical_to_spec(("experts",), (8,), mesh, RULES)
