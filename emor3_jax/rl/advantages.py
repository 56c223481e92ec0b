"""Outcome advantages for group sampling: GRPO, Dr. GRPO, RLOO.

Pure jnp functions on one scalar reward per response. Rows are grouped consecutively: rows
b*n .. b*n + n - 1 are the n responses to prompt b, so rewards [R] is viewed as [G, n] with
R = G * n. The same advantage is later applied to every response token (see `rl.grpo`).

EasyR1 (hiyouga/EasyR1, verl/trainer/core_algos.py: compute_grpo_outcome_advantage,
compute_rloo_outcome_advantage) asserts n > 1 ("GRPO needs rollout.n > 1."); verl instead
treats a group of one as mean 0, std 1 (A = r). A group of one has no baseline, so every
estimator here raises ValueError for n < 2 rather than pick either silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _groups(rewards: jax.Array, n: int) -> jax.Array:
    """[R] -> [G, n] fp32, checking the (static) shapes."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [R], got shape {rewards.shape}")
    if n < 2:
        raise ValueError(f"group size n must be >= 2 (a group of one has no baseline), got {n}")
    if rewards.shape[0] % n:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of n={n}")
    return rewards.astype(jnp.float32).reshape(-1, n)


def grpo_advantages(rewards: jax.Array, n: int, eps: float = 1e-6) -> jax.Array:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps), std unbiased (ddof=1) within each group.

    Args:
      rewards: [R] fp, R = G * n, grouped consecutively.
      n: group size (static), >= 2.
      eps: added to the std; a constant group (std 0) gives A = 0.

    Returns:
      [R] fp32.
    """
    r = _groups(rewards, n)  # [G, n]
    mean = r.mean(axis=1, keepdims=True)
    std = jnp.sqrt(jnp.sum((r - mean) ** 2, axis=1, keepdims=True) / (n - 1))
    return ((r - mean) / (std + eps)).reshape(-1)


def drgrpo_advantages(rewards: jax.Array, n: int) -> jax.Array:
    """Dr. GRPO: A_i = r_i - mean_g (no division by the group std).

    Args:
      rewards: [R] fp, grouped consecutively in groups of n (static, >= 2).

    Returns:
      [R] fp32.
    """
    r = _groups(rewards, n)  # [G, n]
    return (r - r.mean(axis=1, keepdims=True)).reshape(-1)


def rloo_advantages(rewards: jax.Array, n: int) -> jax.Array:
    """RLOO: A_i = r_i - (sum_g - r_i) / (n - 1), the mean of the other n - 1 rewards.

    Equals n / (n - 1) * (r_i - mean_g).

    Args:
      rewards: [R] fp, grouped consecutively in groups of n (static, >= 2).

    Returns:
      [R] fp32.
    """
    r = _groups(rewards, n)  # [G, n]
    baseline = (r.sum(axis=1, keepdims=True) - r) / (n - 1)
    return (r - baseline).reshape(-1)


# The registry the config validation reads (rl.advantage): adding an estimator is one entry.
ESTIMATORS = {"grpo": grpo_advantages, "drgrpo": drgrpo_advantages, "rloo": rloo_advantages}


def compute_advantages(rewards: jax.Array, n: int, estimator: str) -> jax.Array:
    """Dispatches on estimator, a key of ESTIMATORS (static). Returns [R] fp32."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}, expected one of {tuple(ESTIMATORS)}")
    return ESTIMATORS[estimator](rewards, n)
