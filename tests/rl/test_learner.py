"""The optimizer state Learner.init makes: on the params' mesh, so `apply` compiles once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
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


def _easyr1_lr_lambda(current_step: int, num_warmup_steps: int) -> float:
    """EasyR1's get_constant_schedule_with_warmup (verl/utils/torch_functional.py:197-198), the
    multiplier LambdaLR gives after `current_step` scheduler steps (one per GRPO step)."""
    return min(1.0, float(current_step) / float(max(1, num_warmup_steps)))


@pytest.mark.parametrize("warmup, updates_per_step", [(0, 2), (0, 1), (3, 2)])
def test_stepwise_warmup_constant_follows_easyr1s_scheduler(warmup, updates_per_step):
    """Update k of the run has rate lr * lr_lambda(k // updates per GRPO step): with warmup 0
    (the official lr_warmup_ratio 0.0) and 2 updates per step, updates 0 and 1 get 0, then lr
    (a constant schedule from the first update would give lr throughout)."""
    lr = 2e-6
    settings = dataclasses.replace(
        OptimizerSettings.constant(lr),
        schedule="stepwise_warmup_constant",
        warmup_steps=warmup,
        total_steps=80,
        updates_per_step=updates_per_step,
    )
    _, lr_fn = make_optimizer(settings)
    got = [float(lr_fn(k)) for k in range(10)]
    np.testing.assert_allclose(got, [lr * _easyr1_lr_lambda(k // updates_per_step, warmup) for k in range(10)])
    if (warmup, updates_per_step) == (0, 2):
        assert got[:2] == [0.0, 0.0] and got[2] == pytest.approx(lr)


def test_the_3b_optimizer_leaves_the_params_alone_in_the_first_grpo_step():
    """configs/qwen_vl.py:3b trains 512 prompts per step in updates of 256: AdamW's two updates of
    the first GRPO step run at rate 0 (params unchanged, weight decay included, the moments
    and count advance), the third moves the params."""
    from configs.qwen_vl import get_config
    from emor3_jax.core import sharding

    s = OptimizerSettings.from_config(get_config("3b"), "grpo", 80)
    assert (s.schedule, s.updates_per_step, s.warmup_steps) == ("stepwise_warmup_constant", 2, 0)
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:1])
    graphdef, params = nnx.split(_Two(mesh))
    learner = Learner(graphdef, make_optimizer(s)[0])
    opt = learner.init(params)
    for k in range(3):
        before = jax.tree.map(np.asarray, params)
        params, opt, _ = learner.apply(params, opt, jax.tree.map(jnp.ones_like, params))
        pairs = zip(jax.tree.leaves(params), jax.tree.leaves(before))
        moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in pairs)
        assert (moved > 0) == (k == 2), (k, moved)
    count = [int(x) for x in jax.tree.leaves(opt) if np.ndim(x) == 0]
    assert count and all(c == 3 for c in count)
