"""The rollout copy of the policy (rl/rollout_weights.py) on 8 fake CPU devices: its dtype and
each layout's shardings; greedy samples from an fp32 copy are the training model's token for
token in every layout (the plumbing changes nothing but where the weights live), and a bf16
copy samples the same model rounded. Its life in the GRPO step: tests/rl/test_experience.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from emor3_jax.core import sharding
from emor3_jax.core.batches import Prompt
from emor3_jax.models.api import create_model, preset
from emor3_jax.rl import rollout_weights
from emor3_jax.sampling.methods import GREEDY
from emor3_jax.sampling.sampler import Sampler

B, N, G, PAD = 4, 2, 6, 0  # prompts, samples per prompt, new tokens, pad id
RULES = sharding.DEFAULT_RULES
MESHES = {  # layout -> the mesh it is tested on (tensor needs a tensor axis)
    "fsdp": (("data", 1), ("fsdp", 8), ("tensor", 1)),
    "replicated": (("data", 1), ("fsdp", 8), ("tensor", 1)),
    "tensor": (("data", 1), ("fsdp", 4), ("tensor", 2)),
}


def _model(layout: str):
    """(mesh, graphdef, fp32 params) of the tiny preset (vocab 64) on `layout`'s mesh."""
    cfg = preset("tiny", vocab_size=64, param_dtype="float32", compute_dtype="float32")
    mesh = sharding.make_mesh(MESHES[layout])
    graphdef, params = nnx.split(create_model(cfg, mesh, RULES, seed=0))
    return cfg, mesh, graphdef, params


def _flat(tree) -> dict:
    return {"/".join(map(str, path)): x for path, x in nnx.to_flat_state(tree)}


@pytest.mark.parametrize("layout", sorted(MESHES))
def test_the_copy_has_the_dtype_and_the_layouts_shardings(layout):
    _, mesh, _, params = _model(layout)
    copy = rollout_weights.copier(params, mesh, RULES, "bfloat16", layout)(params)
    got, master = _flat(copy), _flat(params)
    assert got.keys() == master.keys()
    for name, v in got.items():
        x, p = v.get_value(), master[name].get_value()
        assert x.dtype == jnp.bfloat16 and x.shape == p.shape, name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(p.astype(jnp.bfloat16)), err_msg=name)
        spec = x.sharding.spec
        if layout == "fsdp":  # a cast only: the training layout
            assert x.sharding.is_equivalent_to(p.sharding, x.ndim), name
        elif layout == "replicated":
            assert x.sharding.is_fully_replicated, name
        else:  # heads / mlp / vocab over tensor, nothing over fsdp
            assert "fsdp" not in jax.tree.leaves(tuple(spec)), (name, spec)
    if layout == "tensor":  # a few by hand
        spec = lambda name: got[name].get_value().sharding.spec
        assert spec("embed_tokens") == P("tensor", None)
        assert spec("layers/self_attn/q_proj/kernel") == P(None, None, "tensor")  # [layers, embed, heads]
        assert spec("layers/mlp/down_proj/kernel") == P(None, "tensor", None)  # [layers, mlp, embed]
        assert spec("norm/weight") == P(None)
    # the abstract copy (dry run, compile_for) says the same
    abstract = rollout_weights.abstract(params, mesh, RULES, "bfloat16", layout)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(copy)):
        assert (a.shape, a.dtype) == (x.shape, x.dtype) and a.sharding.is_equivalent_to(x.sharding, x.ndim)


def test_deleting_a_copy_in_the_params_own_dtype_and_layout_leaves_the_params():
    """The copy never aliases the master weights, even when it is the same dtype and layout."""
    _, mesh, _, params = _model("fsdp")
    copy = rollout_weights.copier(params, mesh, RULES, "float32", "fsdp")(params)
    rollout_weights.delete(copy)
    assert all(x.is_deleted() for x in jax.tree.leaves(copy))
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))
    assert float(sum(jnp.sum(x) for x in jax.tree.leaves(params))) != 0.0


def _prompts() -> list[Prompt]:
    return [Prompt(np.array(list(range(1, 3 + b)), np.int32)) for b in range(B)]


# The layout 3b runs (replicated); fsdp and tensor copies are checked by their shardings above
# and sample through the same program (15 s each on 2 cores).
@pytest.mark.parametrize("layout", ["replicated"])
def test_greedy_samples_of_an_fp32_copy_are_the_training_models(layout):
    """Greedy decoding of the copy: the training model's tokens, token for
    token, and its log-probs to float rounding (another layout sums in another order). A bf16
    copy samples the same model rounded: its log-probs agree to bf16 rounding wherever its
    tokens still agree."""
    cfg, mesh, graphdef, params = _model(layout)
    sampler = Sampler(cfg, prompt_buckets=(8,), gen_buckets=(G,), pad_id=PAD).with_stops((), {})
    run = lambda weights: sampler.generate(
        nnx.merge(graphdef, weights), _prompts(), key=jax.random.key(0), max_new_tokens=G, n=N, params=GREEDY
    )
    with sharding.use_mesh(mesh, RULES):
        want = run(params)
        got = {
            dtype: run(rollout_weights.copier(params, mesh, RULES, dtype, layout)(params))
            for dtype in ("float32", "bfloat16")
        }
    np.testing.assert_array_equal(np.asarray(got["float32"].tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got["float32"].logprobs), np.asarray(want.logprobs), atol=1e-5)
    half, full = got["bfloat16"], want
    same = np.cumprod(np.asarray(half.tokens) == np.asarray(full.tokens), axis=1).astype(bool)  # the agreeing prefix
    assert same[:, 0].all()  # the first greedy token survives the rounding in every row here
    diff = np.abs(np.asarray(half.logprobs) - np.asarray(full.logprobs))[same]
    assert 0 < diff.max() < 0.05, diff.max()  # rounded, not another model
