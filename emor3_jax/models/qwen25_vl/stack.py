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


def scan(stack: M, body: Callable, carry, xs=None, remat: bool = False, unroll: bool = False):
    """jax.lax.scan of `body(layer, carry, x) -> (carry, y)` over the layers of `stack` (each
    `layer` a module holding one layer's parameters) and the leading axis of `xs`; returns
    (carry, ys). `remat`: the body's activations are recomputed in the backward pass, only
    the carry is kept per layer. `unroll`: the loop is unrolled into one copy of the body per
    layer (slower to compile, faster to run where loops cost: tiny models on CPU)."""
    graphdef, state = nnx.split(stack)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat:
        step = jax.checkpoint(step, prevent_cse=False)  # inside a scan CSE cannot undo the remat
    return jax.lax.scan(step, carry, (state, xs), unroll=unroll)
