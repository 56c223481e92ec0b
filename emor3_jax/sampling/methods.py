"""Token selection from logits: greedy, temperature, top-k, top-p (nucleus), min-p.

Pure functions on fp32 logits [B, V]. Filters set excluded tokens to -inf; the order is
transformers' / vLLM's: temperature, then top-k, then top-p, then min-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Static: a new combination compiles a new decode loop."""

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use greedy=True)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")


GREEDY = SamplingParams(greedy=True)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits per row (ties at the k-th value are kept too)."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability sums to >= p.

    A token is kept when the mass strictly before it (in descending order) is < p, so the
    token that crosses p is in the nucleus and the most likely token always is.
    """
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
    """Keeps tokens with probability >= min_p * (largest probability)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    threshold = jnp.max(logp, axis=-1, keepdims=True) + jnp.log(min_p)
    return jnp.where(logp < threshold, -jnp.inf, logits)


def filtered_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """logits [B, V] -> the logits `params` samples from (temperature applied, filters -inf)."""
    x = logits / params.temperature
    if params.top_k:
        x = top_k_filter(x, params.top_k)
    if params.top_p < 1.0:
        x = top_p_filter(x, params.top_p)
    if params.min_p > 0.0:
        x = min_p_filter(x, params.min_p)
    return x


def select(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Next token ids [B] from logits [B, V] (logit bias already added)."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, params), axis=-1).astype(jnp.int32)
