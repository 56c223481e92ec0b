"""The GRPO reference policy's weights: a frozen copy of the params taken when GRPO starts, in
a dtype of its own (rl.reference_dtype; bf16 halves its memory, as the official run keeps it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def copy(params, dtype: str):
    """`params` (a tree of arrays) copied in `dtype`, each leaf in its own sharding."""
    return jax.tree.map(lambda x: jnp.copy(x) if x.dtype == np.dtype(dtype) else x.astype(dtype), params)


def abstract(params, dtype: str):
    """The shapes, `dtype` and shardings of `copy(params, dtype)` (restore and compile targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.dtype(dtype), sharding=x.sharding), params)
