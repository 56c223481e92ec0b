"""The GRPO reference policy's weights: a frozen copy of the params taken when GRPO starts, in
a dtype of its own (rl.reference_dtype; bf16 halves its memory, as the official run keeps it).

With LoRA (lora.rank > 0) the reference is `frozen`: the policy's state with a copy of its
adapters as GRPO starts and its base arrays shared, not copied (they never train). GRPO without
a cold start (3b/7b) starts from fresh adapters, B = 0, so the reference is then the base model
exactly (x A B with B = 0 adds 0); after a LoRA cold start it is the cold-started policy, the
reference the method defines (the policy GRPO starts from), where the base alone would pull every
update back towards the model before the cold start. It keeps the policy's graph and compiled
programs and costs one adapter-sized copy (the policy's own adapters are donated to each
optimizer step, so the reference cannot share them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emor3_jax.models import lora


def copy(params, dtype: str):
    """`params` (a tree of arrays) copied in `dtype`, each leaf in its own sharding."""
    return jax.tree.map(lambda x: jnp.copy(x) if x.dtype == np.dtype(dtype) else x.astype(dtype), params)


def abstract(params, dtype: str):
    """The shapes, `dtype` and shardings of `copy(params, dtype)` (restore and compile targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.dtype(dtype), sharding=x.sharding), params)


def frozen(params):
    """The reference of a LoRA run: `params` with copies of its adapters (each in its own
    sharding) and its base arrays themselves."""
    copy_adapter = lambda v: v.replace(jnp.copy(v.get_value())) if isinstance(v, lora.LoRAParam) else v
    return jax.tree.map(copy_adapter, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
