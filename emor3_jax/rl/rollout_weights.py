"""The policy's weights as the sampler reads them (rl.rollout_dtype, rl.rollout_sharding): a
copy in an inference dtype (bf16: the official run samples with vLLM in bf16) and an inference
layout, made from the fp32 master weights right before a GRPO step's rollouts and deleted
before its update, which never sees it.

A layout is the rule set the copy's parameters are sharded by, derived from the training
rules (LAYOUTS, the registry the config validation reads):
- "fsdp": the training rules, a cast only; each decoded token still gathers every layer's
  weights over the fsdp devices, as the training model's decode does.
- "replicated": every device holds every weight; decoding is purely data parallel, with no
  weight gathers, at the whole model's bytes on each device.
- "tensor": heads / mlp / vocab over the mesh's tensor axis and nothing over data or fsdp:
  the weights split over the model-parallel devices, whole on each data-parallel group.
Activations keep the sampler's rules (batch over data x fsdp) whatever the layout.

With LoRA the copy holds the adapted weights merged, W + A B alpha/rank in each adapted kernel
(models/lora.py `merged`) and its adapters zeros: a decode step then reads the same kernels as
without LoRA, and the merge costs one thin matmul per kernel per GRPO step. (Without a copy,
rl.rollout_dtype = "", the sampler runs the training model: the adapters applied on the fly.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from emor3_jax.core import sharding
from emor3_jax.models import lora


def _only(target, axis: str):
    """The mesh axis `axis` if a rule's target (None, an axis or a tuple of axes) names it, else None."""
    named = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return axis if axis in named else None


# layout -> (training rules -> the copy's rules)
LAYOUTS: dict[str, Callable] = {
    "fsdp": lambda rules: tuple(tuple(r) for r in rules),
    "replicated": lambda rules: tuple((name, None) for name, _ in rules),
    "tensor": lambda rules: tuple((name, _only(target, "tensor")) for name, target in rules),
}


def shardings(params, mesh, rules, layout: str):
    """NamedSharding of each parameter of the copy: `params` (an nnx.State whose variables
    carry logical `axes`, concrete or abstract) under `layout`'s rules made from the training
    `rules`."""
    return sharding.state_shardings(params, mesh, LAYOUTS[layout](rules))


def cast(params, dtype: str):
    """`params` with its adapters merged (none: as they are) and every leaf in `dtype`: the copy's values."""
    return jax.tree.map(lambda x: x.astype(dtype), lora.merged(params))


def copier(params, mesh, rules, dtype: str, layout: str) -> Callable:
    """The jitted params -> copy, for params laid out as `params` (by the training `rules`).
    The cast runs where each master shard lives, before the copy is laid out, so a layout
    that gathers moves `dtype` bytes (half of fp32's for bf16). The output never aliases the
    params (jit with out_shardings returns new buffers), so deleting it leaves them whole."""
    trained = sharding.state_shardings(params, mesh, rules)

    def copy(p):
        return jax.lax.with_sharding_constraint(cast(p, dtype), trained)

    return jax.jit(copy, out_shardings=shardings(params, mesh, rules, layout))


def abstract(params, mesh, rules, dtype: str, layout: str):
    """The shapes, `dtype` and shardings of the copy (the dry run and compile_for count it)."""
    out = shardings(params, mesh, rules, layout)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, np.dtype(dtype), sharding=s), params, out)


def delete(copy) -> None:
    """Frees the copy's device buffers now, not whenever Python drops its last reference (the
    sampler's programs may still hold one): the update's programs run without it."""
    for x in jax.tree.leaves(copy):
        x.delete()
