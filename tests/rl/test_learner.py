"""The optimizer state Learner.init makes: on the params' mesh, so `apply` compiles once."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from emor3_jax.rl.learner import Learner, OptimizerSettings, make_optimizer


class _Two(nnx.Module):
    def __init__(self, mesh):
        on_mesh = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        self.w = nnx.Param(on_mesh(jnp.ones((4, 3))))
        self.b = nnx.Param(on_mesh(jnp.zeros((3,))))


@pytest.mark.parametrize("devices", [1, 8])
def test_init_places_all_state_on_the_mesh_and_apply_compiles_once(devices):
    from emor3_jax.core import sharding

    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:devices])
    graphdef, params = nnx.split(_Two(mesh))
    tx, _ = make_optimizer(OptimizerSettings.constant(1e-3))
    learner = Learner(graphdef, tx)
    opt = learner.init(params)
    for leaf in jax.tree.leaves(opt):
        assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh == mesh
    for _ in range(3):
        params, opt, _ = learner.apply(params, opt, jax.tree.map(jnp.ones_like, params))
    assert learner._apply._cache_size() == 1  # one program: the state's shardings never change
