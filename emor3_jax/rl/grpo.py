"""GRPO losses as pure jnp functions: token log-probs, entropy, KL estimators, the clipped
policy loss with dual clip, and masked aggregation.

Shapes: B responses, T response tokens, V vocabulary. `mask` [B, T] is 1 on response tokens
(through EOS) and 0 on padding; bool or float. Everything returned is fp32. String options
(`kind`, `mode`) are static: jit with static_argnames.

Formulas follow EasyR1 (hiyouga/EasyR1, verl/trainer/core_algos.py: compute_policy_loss,
compute_kl, average_loss; verl/workers/actor/dp_actor.py adds the KL as a loss term
aggregated like the policy loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOG_RATIO_CLAMP = 20.0  # |log pi/pi_old| and |log pi_ref/pi| are clamped before exp
KL_CLAMP = 10.0  # k3 values are clamped to [-10, 10]


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] = l_target - logsumexp_v(l_v) = -logsumexp_v(l_v - l_target).

    Computed in fp32 in the second form: subtracting l_target inside the reduction keeps
    full precision when logits are large (|l| ~ 1000 costs l - lse ~3e-5 absolute in fp32).

    Args:
      logits: [B, T, V] any float dtype (already divided by the temperature, if any).
      targets: [B, T] int token ids.

    Returns:
      [B, T] fp32. The [B, T, V] log_softmax is never formed: one gather, one fused logsumexp.
    """
    x = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)  # [B, T, 1]
    return -jax.nn.logsumexp(x - picked, axis=-1)


def entropy(logits: jax.Array) -> jax.Array:
    """H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, p = softmax(l), z = l - max(l).

    In fp32; the shift by max(l) keeps the two terms small, so they do not cancel
    catastrophically when logits are large.

    Args:
      logits: [B, T, V] any float dtype.

    Returns:
      [B, T] fp32.
    """
    x = logits.astype(jnp.float32)
    z = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.exp(z - lse[..., None])
    return lse - jnp.sum(p * z, axis=-1)


def _k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    return logp - ref_logp


def _k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    return 0.5 * jnp.square(logp - ref_logp)


def _k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    d = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)


# The registries the config validation reads (rl.kl_kind, rl.loss_mode): a new kind is one entry.
KL_KINDS = {"k1": _k1, "k2": _k2, "k3": _k3, "low_var_kl": _k3}


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs.

    - "k1": logp - ref_logp
    - "k2": 0.5 * (logp - ref_logp)^2
    - "k3" / "low_var_kl" (Schulman): d = clamp(ref_logp - logp, -20, 20),
      kl = clamp(exp(d) - d - 1, -10, 10)  (the inner clamp keeps exp and its gradient finite)

    Args:
      logp, ref_logp: [B, T].
      kind: one of KL_KINDS (static).

    Returns:
      [B, T] fp32.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}, expected one of {tuple(KL_KINDS)}")
    return KL_KINDS[kind](logp.astype(jnp.float32), ref_logp.astype(jnp.float32))


def _token_mean(xm: jax.Array, m: jax.Array) -> jax.Array:
    return jnp.sum(xm) / jnp.maximum(jnp.sum(m), 1.0)


def _seq_mean(xm: jax.Array, m: jax.Array) -> jax.Array:
    count = jnp.sum(m, axis=-1)  # [B]
    per_seq = jnp.sum(xm, axis=-1) / jnp.maximum(count, 1.0)  # [B]
    has_tokens = (count > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)


MODES = {"token": _token_mean, "seq": _seq_mean}


def aggregate(x: jax.Array, mask: jax.Array, mode: str, groups: int = 1) -> jax.Array:
    """Masked mean of per-token values over the mini-batch, or the mean over `groups` equal
    blocks of rows of each block's own masked mean.

    - "token": sum_bt x*m / sum_bt m  (every response token weighs the same)
    - "seq":   mean over sequences with sum_t m > 0 of (sum_t x*m / sum_t m)
               (every response weighs the same)
    - groups = K > 1: (1/K) sum_k aggregate(rows k*B/K .. (k+1)*B/K - 1): each data-parallel
      shard's micro-batch takes its own mean and the shards' means are averaged, as the official
      run's loss over K GPUs (EasyR1 dp_actor.py:252-275 per GPU, FSDP averaging the gradients).

    Empty masks give 0, not NaN. EasyR1's "seq" divides by all B rows (an empty row counts as 0);
    here empty rows (e.g. batch padding) are left out. The two agree when every row has a token.

    Args:
      x: [B, T]; mask: [B, T] bool or 0/1 float; mode: one of MODES (static); groups: K, a
      divisor of B (static).

    Returns:
      scalar fp32.
    """
    if mode not in MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}, expected one of {tuple(MODES)}")
    if groups < 1 or mask.shape[0] % groups:
        raise ValueError(f"{mask.shape[0]} rows do not split into {groups} equal groups")
    m = mask.astype(jnp.float32)
    xm = jnp.where(m > 0, x.astype(jnp.float32), 0.0) * m  # masked garbage (inf, NaN) must not leak into the sum
    if groups == 1:
        return MODES[mode](xm, m)
    per_group = lambda a: a.reshape(groups, -1, a.shape[-1])  # [K, B/K, T]
    return jnp.mean(jax.vmap(MODES[mode])(per_group(xm), per_group(m)))


def _check_shapes(mask: jax.Array, advantages: jax.Array, **per_token: jax.Array) -> None:
    for name, a in per_token.items():
        if a.shape != mask.shape:
            raise ValueError(f"{name} has shape {a.shape}, mask has {mask.shape}")
    if mask.ndim != 2 or advantages.shape != mask.shape[:1]:
        raise ValueError(f"advantages must be [B] with mask [B, T], got {advantages.shape} and {mask.shape}")


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float = 3.0,
    mode: str = "token",
    groups: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate with asymmetric clip range and dual clip, per token:

      ratio   = exp(clamp(logp - old_logp, -20, 20))
      pg1     = -A * ratio
      pg2     = -A * clip(ratio, 1 - clip_low, 1 + clip_high)
      clipped = max(pg1, pg2)
      pg      = min(clipped, -A * dual_clip) if A < 0 else clipped
      loss    = aggregate(pg, mask, mode, groups)

    Args:
      logp: [B, T] log-probs of the policy being trained (gradients flow through these).
      old_logp: [B, T] log-probs of the policy that sampled the responses.
      advantages: [B], one per response, applied to each of its tokens.
      mask: [B, T] response-token mask.
      clip_low, clip_high: the clip range [1 - clip_low, 1 + clip_high].
      dual_clip: the cap on -A * ratio for A < 0 (> 1).
      mode: "token" | "seq" (static), see `aggregate`.
      groups: the loss's row groups (static), see `aggregate`.

    Returns:
      (loss, metrics): loss a scalar; metrics scalars, token means over the mask as in EasyR1
      whatever the mode and groups:
        clipfrac       pg1 < pg2 (the clip range bound: A > 0 with ratio > 1 + clip_high, or
                       A < 0 with ratio < 1 - clip_low)
        clipfrac_dual  A < 0 and max(pg1, pg2) > -A * dual_clip
        ratio_mean     ratio
        approx_kl      -clamp(logp - old_logp, -20, 20): EasyR1's `ppo_kl`, the clamped log
                       ratio the loss sees (unclamped, one token with a -1e4 log ratio would
                       dominate the mean)
    """
    _check_shapes(mask, advantages, logp=logp, old_logp=old_logp)
    logp = logp.astype(jnp.float32)
    old_logp = old_logp.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]  # [B, 1]

    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = jnp.maximum(pg1, pg2)
    pg3 = -adv * dual_clip
    negative = adv < 0  # [B, 1]
    pg = jnp.where(negative, jnp.minimum(clipped, pg3), clipped)

    loss = aggregate(pg, mask, mode, groups)
    metrics = {
        "clipfrac": aggregate(pg1 < pg2, mask, "token"),
        "clipfrac_dual": aggregate(negative & (clipped > pg3), mask, "token"),
        "ratio_mean": aggregate(ratio, mask, "token"),
        "approx_kl": aggregate(-log_ratio, mask, "token"),
    }
    return loss, metrics


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float = 3.0,
    kl_coef: float = 0.01,
    kl_kind: str = "low_var_kl",
    mode: str = "token",
    groups: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss = policy_loss + kl_coef * aggregate(kl_penalty(logp, ref_logp), mask, mode, groups).

    The KL to the reference model is a loss term (EasyR1 use_kl_loss), not a reward penalty,
    aggregated in the same mode as the policy loss.

    Args:
      logp, old_logp, ref_logp: [B, T]; advantages: [B]; mask: [B, T].
      clip_low, clip_high, dual_clip, mode, groups: see `policy_loss`.
      kl_coef: weight of the KL term; kl_kind: see `kl_penalty` (static).

    Returns:
      (loss, metrics): metrics = policy_loss metrics + pg_loss, kl (the aggregated KL), loss.
    """
    _check_shapes(mask, advantages, ref_logp=ref_logp)
    pg_loss, metrics = policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, mode, groups)
    kl = aggregate(kl_penalty(logp, ref_logp, kl_kind), mask, mode, groups)
    loss = pg_loss + kl_coef * kl
    return loss, {**metrics, "pg_loss": pg_loss, "kl": kl, "loss": loss}
