"""The divergence guard's checks: what the parameters produce and how far one step moved them.

Each check returns None when healthy, else why not in a few words; the trainer adds the step,
the flag to change, and stops before the step's parameters are saved. A finite loss and
gradient norm (learner.check_finite) are not enough: a step with a huge learning rate leaves
finite but blown-up parameters whose next rollout samples garbage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax.core.multihost import to_host


@jax.jit
def param_norm(params) -> jax.Array:
    """Global L2 norm of every floating-point leaf, in fp32: sqrt(sum_i ||p_i||^2)."""
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def norm_ratio(before: float, after: float, max_ratio: float) -> str | None:
    """The step multiplied or divided the global parameter norm by more than `max_ratio`
    (a healthy step changes it by well under 1%), or left it non-finite."""
    before, after = float(before), float(after)
    if not np.isfinite(after):
        return f"non-finite parameters (norm {after})"
    ratio = max(after / before, before / after) if before > 0 and after > 0 else float("inf")
    if ratio > max_ratio:
        return f"the update changed the parameter norm {before:.4g} -> {after:.4g} (x{ratio:.3g} > {max_ratio})"
    return None


def logprobs(name: str, values: list, masks: list, min_logprob: float) -> str | None:
    """Log-probs [m, G] of the response tokens (where `masks` [m, G] is set) are non-finite or
    below `min_logprob` (a probability no sane model gives a token it or a sibling sampled)."""
    # The learner's log-probs are sharded over the batch, across processes on a pod.
    vals = np.concatenate([to_host(v).astype(np.float32)[np.asarray(m, bool)] for v, m in zip(values, masks)])
    if vals.size == 0:
        return None
    if not np.isfinite(vals).all():
        return f"non-finite {name} log-probs ({int((~np.isfinite(vals)).sum())} of {vals.size} tokens)"
    low = float(vals.min())
    if low < min_logprob:
        return f"{name} log-prob {low:.4g} < {min_logprob} ({int((vals < min_logprob).sum())} of {vals.size} tokens)"
    return None


def token_ids(tokens: np.ndarray, lengths: np.ndarray, vocab: int) -> str | None:
    """Sampled ids [R, G] (the first `lengths` [R] of each row) outside the tokenizer's [0, vocab)."""
    tokens = np.asarray(tokens)
    valid = np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]
    bad = valid & ((tokens < 0) | (tokens >= vocab))
    if bad.any():
        return f"sampled {int(bad.sum())} token ids outside the tokenizer's 0..{vocab - 1} (e.g. {int(tokens[bad][0])})"
    return None
