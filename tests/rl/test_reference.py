"""The GRPO reference's weights in a dtype of their own (rl.reference_dtype): the copy, its
abstract twin (restore and compile targets) and the memory it takes (the log-probs it gives:
rl/test_experience.py)."""

import jax
import numpy as np
from flax import nnx

from configs.qwen_vl import get_config
from emor3_jax import config_lib, dry_run
from emor3_jax.core import sharding
from emor3_jax.models.api import create_model, preset
from emor3_jax.rl import reference


def _params(devices=8):
    cfg = preset("tiny", vocab_size=64, param_dtype="float32", compute_dtype="float32")
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:devices])
    return nnx.state(create_model(cfg, mesh, sharding.DEFAULT_RULES, seed=0))


def test_the_copy_has_its_dtype_and_the_params_shardings_and_abstract_says_so():
    params = _params()
    for dtype in ("bfloat16", "float32"):
        ref, abstract = reference.copy(params, dtype), reference.abstract(params, dtype)
        leaves, abstracts = jax.tree.leaves(ref), jax.tree.leaves(abstract)
        assert [x.dtype for x in leaves] == [np.dtype(dtype)] * len(leaves)
        for x, a, p in zip(leaves, abstracts, jax.tree.leaves(params)):
            assert x.sharding == p.sharding == a.sharding and x.shape == a.shape == p.shape and x.dtype == a.dtype
            assert x is not p  # a copy, not the params themselves (they go on training)
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(p), rtol=2**-8)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(params))  # something was sharded


def test_the_dry_run_counts_a_bf16_reference_at_half_the_params():
    c = get_config("3b")
    per_device = {}
    for dtype in ("", "bfloat16"):
        c.rl.reference_dtype = dtype
        assert config_lib.reference_dtype(c) == (dtype or "float32")
        per_device[dtype] = dry_run.memory(c)["per_device"]  # over the suite's 8 CPU devices
    assert per_device[""]["reference"] == per_device[""]["params"]
    assert per_device["bfloat16"]["reference"] * 2 == per_device[""]["params"]
