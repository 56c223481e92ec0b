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

    A token is kept when the mass of the tokens more likely than it is < p, so the token that
    crosses p is in the nucleus and the most likely token always is (tokens of equal
    probability are kept or dropped together). The kept set is every probability >= a
    threshold, which a bisection over the probabilities' bit patterns (non-negative floats
    order as their int32 bits do) finds exactly in 31 masked sums over [B, V]: on a CPU ~15x
    faster than sorting a 152k vocabulary.
    """
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

    def halve(_, bounds):
        # mass strictly above lo is >= p, above hi is < p; the threshold is in (lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        above = jnp.sum(jnp.where(bits > mid[:, None], probs, 0.0), axis=-1) >= p
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    start = (jnp.full(bits.shape[:1], -1, jnp.int32), bits.max(axis=-1))
    _, threshold = jax.lax.fori_loop(0, 31, halve, start)
    return jnp.where(bits >= threshold[:, None], logits, -jnp.inf)


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


def argmax(logits: jax.Array) -> jax.Array:
    """First index of the row maximum [B]; a max and a masked min, which XLA's CPU backend
    runs ~5x faster than its variadic argmax reduction."""
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def categorical(keys: jax.Array, logits: jax.Array, block: int = 128) -> jax.Array:
    """One draw per row from softmax(logits) [B, V] (-inf = never), by inverting the CDF.

    keys [B]: one key per row, so a row's draw does not depend on the other rows in the batch
    (the sampler's slots hold different rows over time). One uniform per row instead of a
    Gumbel number per vocabulary entry (the RNG dominates a decode step otherwise). The CDF
    is searched in two levels, blocks of `block` tokens then within the chosen block, so no
    full-vocabulary cumsum is needed. Rounding at a block edge can only land on a token of
    positive probability.
    """
    b, v = logits.shape
    nb = -(-v // block)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V], 0 where -inf
    e = jnp.pad(e, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    block_mass = e.sum(-1)  # [B, nb]
    cdf = jnp.cumsum(block_mass, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys) * cdf[:, -1]
    blk = _first_above(cdf, u, block_mass > 0)  # [B]
    inner = jnp.take_along_axis(e, blk[:, None, None], axis=1)[:, 0]  # [B, block]
    before = jnp.take_along_axis(cdf - block_mass, blk[:, None], axis=1)[:, 0]
    pos = _first_above(jnp.cumsum(inner, axis=-1), u - before, inner > 0)
    return blk * block + pos


def _first_above(cdf: jax.Array, u: jax.Array, positive: jax.Array) -> jax.Array:
    """Index of the first cdf entry > u per row, kept on an entry with positive mass."""
    n = cdf.shape[-1]
    idx = jnp.sum(cdf <= u[:, None], axis=-1).astype(jnp.int32)
    iota = jnp.arange(n, dtype=jnp.int32)
    last_positive = jnp.max(jnp.where(positive, iota, -1), axis=-1)
    first_positive = jnp.min(jnp.where(positive, iota, n), axis=-1)
    return jnp.clip(idx, first_positive, last_positive)


def select(logits: jax.Array, keys: jax.Array, params: SamplingParams) -> jax.Array:
    """Next token ids [B] from logits [B, V] (logit bias already added), keys [B] one per row."""
    if params.greedy:
        return argmax(logits)
    return categorical(keys, filtered_logits(logits, params))
