"""Layers stored stacked and run in a scan: one compiled layer body however deep the model.

A stack is one module whose parameters carry a leading layer axis Y (logical axis
`LAYER_AXIS`, replicated by the default rules). `scan` runs a body over its layers with
jax.lax.scan, so XLA compiles one loop instead of Y unrolled copies of the layer (the 3B
gradient compiles in a fraction of the time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

LAYER_AXIS = "layers"
# What a rematerialised layer keeps for the backward pass besides its input (model.remat_policy):
# nothing (everything recomputed: the least memory), or the outputs of its weight matmuls
# (projections and MLP; attention scores and elementwise work recomputed).
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
M = TypeVar("M", bound=nnx.Module)


def stacked(make: Callable[[nnx.Rngs], M], n: int, rngs: nnx.Rngs) -> M:
    """`n` independently drawn `make(rngs)` as one module: every parameter [n, ...], its
    `axes` metadata with LAYER_AXIS in front."""
    graphdef = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))[0]
    keys = jax.random.split(rngs.params(), n)
    state = jax.vmap(lambda k: nnx.state(make(nnx.Rngs(params=k))))(keys)
    state = jax.tree.map(
        lambda v: v.replace(axes=(LAYER_AXIS, *v.get_metadata()["axes"])),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, state)


def scan(stack: M, body: Callable, carry, xs=None, remat: str | None = None, unroll: bool = False):
    """jax.lax.scan of `body(layer, carry, x) -> (carry, y)` over the layers of `stack` (each
    `layer` a module holding one layer's parameters) and the leading axis of `xs`; returns
    (carry, ys). `remat` (a REMAT_POLICIES name): the body's activations are recomputed in the
    backward pass, keeping per layer only the carry and what the policy saves. `unroll`: the
    loop is unrolled into one copy of the body per layer (slower to compile, faster to run
    where loops cost: tiny models on CPU)."""
    graphdef, state = nnx.split(stack)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat:  # prevent_cse off: inside a scan CSE cannot undo the remat
        step = jax.checkpoint(step, prevent_cse=False, policy=REMAT_POLICIES[remat])
    return jax.lax.scan(step, carry, (state, xs), unroll=unroll)
