"""The GRPO reference policy's weights: a frozen copy of the params taken when GRPO starts, in
a dtype of its own (rl.reference_dtype; bf16 halves its memory, as the official run keeps it).

With LoRA (lora.rank > 0) the reference is the base model: `base`, the policy's state with its
adapters zeros and its base arrays shared, not copied (they never train). A flag that skips the
adapter branch would need a second model graph and its own compiled programs; zeros keep the
policy's graph and programs, cost a few adapter-sized arrays and two thin matmuls per projection,
and give the base's log-probs exactly (x A B with A = B = 0 adds 0). Both matrices are zeroed,
not just B: the policy's own adapters are donated to each optimizer step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax.models import lora


def copy(params, dtype: str):
    """`params` (a tree of arrays) copied in `dtype`, each leaf in its own sharding."""
    return jax.tree.map(lambda x: jnp.copy(x) if x.dtype == np.dtype(dtype) else x.astype(dtype), params)


def abstract(params, dtype: str):
    """The shapes, `dtype` and shardings of `copy(params, dtype)` (restore and compile targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.dtype(dtype), sharding=x.sharding), params)


def base(params):
    """The reference of a LoRA run: `params` with the adapters off (their base arrays, no copy)."""
    return lora.adapters_off(params)
