"""GRPO losses on hand-worked numbers, then against plain-numpy formulas on random inputs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.rl import grpo

LN2, LN4 = math.log(2.0), math.log(4.0)


def _jit(fn, **static):
    return jax.jit(functools.partial(fn, **static))


# --- token_logprobs / entropy ---------------------------------------------------------------


def test_token_logprobs_and_entropy_by_hand():
    # logits [0, 0, ln 2]: softmax [1/4, 1/4, 1/2], logsumexp ln 4.
    logits = np.array([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]], np.float32)  # [1, 2, 3]
    targets = np.array([[2, 0]])
    lp = jax.jit(grpo.token_logprobs)(logits, targets)
    # target 2: ln 2 - ln 4 = -ln 2; target 0: -ln 4. (The raw logit, 0 or ln 2, would be wrong.)
    np.testing.assert_allclose(lp, [[-LN2, -LN4]], rtol=1e-6)
    # H = -(2 * 1/4 ln 1/4 + 1/2 ln 1/2) = 0.5 ln 4 + 0.5 ln 2 = 1.0397208.
    np.testing.assert_allclose(jax.jit(grpo.entropy)(logits), [[1.0397208, 1.0397208]], rtol=1e-6)


def test_token_logprobs_large_logits_bf16():
    # Logits near 1000 overflow a naive exp; two equal logits give -ln 2 and entropy ln 2.
    logits = jnp.array([[[1000.0, 1000.0]]], jnp.bfloat16)
    lp = grpo.token_logprobs(logits, jnp.array([[1]]))
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, [[-LN2]], rtol=1e-6)
    np.testing.assert_allclose(grpo.entropy(logits), [[LN2]], rtol=1e-6)


# --- kl_penalty ---------------------------------------------------------------------------


def test_kl_kinds_by_hand():
    logp, ref = np.array([[-1.0]], np.float32), np.array([[-2.0]], np.float32)
    kl = functools.partial(grpo.kl_penalty, logp, ref)
    np.testing.assert_allclose(kl("k1"), [[1.0]])  # logp - ref; the reverse sign would be -1
    np.testing.assert_allclose(kl("k2"), [[0.5]])  # 0.5 * 1^2
    # d = ref - logp = -1: e^-1 + 1 - 1 = 0.3678794. With d = logp - ref: e - 2 = 0.7182818.
    np.testing.assert_allclose(kl("k3"), [[0.3678794]], rtol=1e-6)
    np.testing.assert_allclose(kl("low_var_kl"), [[0.3678794]], rtol=1e-6)
    with pytest.raises(ValueError, match="k4"):
        kl("k4")


def test_k3_clamps():
    # d = ref - logp = +-50 -> clamped to +-20: e^20 - 21 and e^-20 + 19 both exceed 10 -> 10.
    # d = 1000 would be exp(1000) = inf without the inner clamp; the output is clamped to 10.
    logp = jnp.array([[0.0, -50.0, -1000.0, -1.0]])
    ref = jnp.array([[-50.0, 0.0, 0.0, -1.0]])
    np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k3"), [[10.0, 10.0, 10.0, 0.0]])
    # Gradient through the clamps is 0 and finite; with only the outer clamp the gradient at
    # d = 1000 is 0 * inf = NaN.
    g = jax.grad(lambda lp: grpo.kl_penalty(lp, ref, "k3").sum())(logp)
    np.testing.assert_array_equal(g, [[0.0, 0.0, 0.0, 0.0]])
    # In range the gradient is d/dlogp (e^d - d - 1) = 1 - e^d, with d = ref - logp = -1 -> 0.632.
    g = jax.grad(lambda lp: grpo.kl_penalty(lp, jnp.array([[-2.0]]), "k3").sum())(jnp.array([[-1.0]]))
    np.testing.assert_allclose(g, [[1 - math.exp(-1)]], rtol=1e-6)


# --- aggregate ----------------------------------------------------------------------------


def test_aggregate_token_vs_seq():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [7.0, 7.0, 7.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], np.float32)
    # token: (1 + 2 + 3 + 4) / 4 = 2.5. seq: mean(2, 4) = 3.0 over the two non-empty rows;
    # counting the empty row as 0 (EasyR1) would give 2.0; ignoring the mask would pull in 99s.
    np.testing.assert_allclose(_jit(grpo.aggregate, mode="token")(x, mask), 2.5)
    np.testing.assert_allclose(_jit(grpo.aggregate, mode="seq")(x, mask), 3.0)
    np.testing.assert_allclose(grpo.aggregate(x, mask.astype(bool), "seq"), 3.0)
    with pytest.raises(ValueError, match="batch"):
        grpo.aggregate(x, mask, "batch")


def test_aggregate_in_groups_averages_each_groups_own_mean():
    """groups=2: rows 0-1 and 2-3 each take their own mean (the official loss on 2 GPUs).
    token: group 0 (1 + 2 + 3 + 4) / 4 = 2.5, group 1 (10 + 20) / 2 = 15 -> 8.75; one group of
    all 6 tokens would give 40 / 6 = 6.67. seq: group 0 mean(2, 4) = 3, group 1 mean(10, 20) = 15
    -> 9."""
    x = np.array([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [10.0, 99.0, 99.0], [20.0, 99.0, 99.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0]], np.float32)
    np.testing.assert_allclose(_jit(grpo.aggregate, mode="token", groups=2)(x, mask), 8.75)
    np.testing.assert_allclose(_jit(grpo.aggregate, mode="seq", groups=2)(x, mask), 9.0)
    np.testing.assert_allclose(grpo.aggregate(x, mask, "token", groups=4), (2 + 4 + 10 + 20) / 4)
    with pytest.raises(ValueError, match="4 rows do not split into 3 equal groups"):
        grpo.aggregate(x, mask, "token", groups=3)


def test_aggregate_empty_mask_and_masked_garbage():
    x = np.array([[np.inf, np.nan]], np.float32)
    zero = np.zeros((1, 2), np.float32)
    for mode in ("token", "seq"):
        assert grpo.aggregate(x, zero, mode) == 0.0  # not NaN
        np.testing.assert_allclose(grpo.aggregate(x, np.array([[0.0, 0.0]]), mode), 0.0)
    # inf at a masked position must not turn the mean into NaN (inf * 0 = NaN).
    x = np.array([[2.0, np.inf]], np.float32)
    np.testing.assert_allclose(grpo.aggregate(x, np.array([[1.0, 0.0]], np.float32), "token"), 2.0)


# --- policy_loss --------------------------------------------------------------------------

# One token per row: (advantage, ratio) -> per-token loss
#   0: A=+1, r=1.5 > 1.3: max(-1.5, -1.3) = -1.3   clip (no clip: -1.5; symmetric 0.2: -1.2)
#   1: A=+1, r=0.5:       max(-0.5, -0.8) = -0.5   no clip
#   2: A=-1, r=0.5 < 0.8: max(0.5, 0.8)   = 0.8    clip
#   3: A=-1, r=1.5:       max(1.5, 1.3)   = 1.5    no clip
#   4: A=-1, r=5:         max(5, 1.3) = 5, dual min(5, 3) = 3   dual clip (without: 5)
#   5: A=+2, r=5:         max(-10, -2.6)  = -2.6   clip; dual not for A > 0 (else min(-2.6, -6) = -6)
ADV = np.array([1.0, 1.0, -1.0, -1.0, -1.0, 2.0], np.float32)
RATIO = np.array([1.5, 0.5, 0.5, 1.5, 5.0, 5.0])
PER_TOKEN = np.array([-1.3, -0.5, 0.8, 1.5, 3.0, -2.6])


def test_policy_loss_clip_cases_by_hand():
    logp = np.log(RATIO).astype(np.float32)[:, None]
    old = np.zeros_like(logp)
    mask = np.ones_like(logp)
    loss, m = _jit(grpo.policy_loss, mode="token")(logp, old, ADV, mask)
    np.testing.assert_allclose(loss, PER_TOKEN.mean(), rtol=1e-5)  # 0.9 / 6 = 0.15
    np.testing.assert_allclose(m["clipfrac"], 3 / 6)  # rows 0, 2, 5
    np.testing.assert_allclose(m["clipfrac_dual"], 1 / 6)  # row 4
    np.testing.assert_allclose(m["ratio_mean"], 14 / 6, rtol=1e-6)
    np.testing.assert_allclose(m["approx_kl"], -np.log(RATIO).mean(), rtol=1e-6)  # mean(old - new)
    # Each token on its own (T=1 rows, seq mode gives the same mean here).
    for i in range(6):
        li, _ = grpo.policy_loss(logp[i : i + 1], old[i : i + 1], ADV[i : i + 1], mask[i : i + 1])
        np.testing.assert_allclose(li, PER_TOKEN[i], rtol=1e-6, err_msg=f"row {i}")


def test_approx_kl_is_easyr1_ppo_kl_the_clamped_log_ratio():
    # Log ratios (logp - old_logp) of three tokens: -30 (a token the old policy liked far more),
    # 0.5, 1.0; the fourth is padding. EasyR1's ppo_kl = mean(-clamp(log ratio, -20, 20))
    # = -(-20 + 0.5 + 1.0) / 3 = 18.5 / 3 = 6.1666667. Unclamped: 28.5 / 3 = 9.5.
    logp = np.array([[-31.0, -1.5, -1.0, 7.0]], np.float32)
    old = np.array([[-1.0, -2.0, -2.0, 0.0]], np.float32)
    mask = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
    _, m = grpo.policy_loss(logp, old, np.array([1.0], np.float32), mask)
    np.testing.assert_allclose(m["approx_kl"], 18.5 / 3, rtol=1e-6)


def test_policy_loss_gradient_zero_when_clipped():
    # d loss / d logp = -A * ratio / N where unclipped, 0 where clipped.
    logp = jnp.asarray(np.log(RATIO), jnp.float32)[:, None]
    g = jax.grad(lambda lp: grpo.policy_loss(lp, jnp.zeros_like(lp), jnp.asarray(ADV), jnp.ones_like(lp))[0])(logp)
    want = np.array([0.0, -0.5, 0.0, 1.5, 0.0, 0.0]) / 6
    np.testing.assert_allclose(g[:, 0], want, rtol=1e-5, atol=1e-8)


def test_policy_loss_log_ratio_clamp():
    # logp - old = 100: exp(100) = inf in fp32 without the clamp at 20. A=+1 clips to -1.3,
    # A=-1 is capped by the dual clip at 3; both finite, with finite (zero) gradients.
    logp = jnp.array([[100.0], [100.0]])
    adv = jnp.array([1.0, -1.0])
    f = lambda lp: grpo.policy_loss(lp, jnp.zeros_like(lp), adv, jnp.ones_like(lp))  # noqa: E731
    loss, m = f(logp)
    np.testing.assert_allclose(loss, (-1.3 + 3.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], math.exp(20.0), rtol=1e-5)
    np.testing.assert_array_equal(jax.grad(lambda lp: f(lp)[0])(logp), [[0.0], [0.0]])


def test_policy_loss_token_vs_seq_unequal_lengths():
    # Ratio 1 everywhere, so per-token loss = -A. Row 0: A=1, 3 tokens; row 1: A=-2, 1 token.
    # token: (3 * -1 + 1 * 2) / 4 = -0.25; seq: (-1 + 2) / 2 = 0.5.
    logp = np.zeros((2, 3), np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
    adv = np.array([1.0, -2.0], np.float32)
    tok, _ = _jit(grpo.policy_loss, mode="token")(logp, logp, adv, mask)
    seq, _ = _jit(grpo.policy_loss, mode="seq")(logp, logp, adv, mask)
    np.testing.assert_allclose([tok, seq], [-0.25, 0.5])


def test_policy_loss_shape_errors():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="advantages"):
        grpo.policy_loss(x, x, np.zeros((2, 3), np.float32), x)
    with pytest.raises(ValueError, match="old_logp"):
        grpo.policy_loss(x, x[:, :2], np.zeros(2, np.float32), x)


# --- grpo_loss ----------------------------------------------------------------------------


def test_grpo_loss_by_hand():
    # Row 0 (A=+1, r=1.5 -> -1.3) and row 3 (A=-1, r=1.5 -> 1.5): pg_loss = 0.1.
    # ref_logp = logp - 1 per token: k1 = 1, d = -1, k3 = e^-1 = 0.3678794.
    logp = np.full((2, 1), math.log(1.5), np.float32)
    old = np.zeros_like(logp)
    ref = logp - 1.0
    adv = np.array([1.0, -1.0], np.float32)
    mask = np.ones_like(logp)
    f = _jit(grpo.grpo_loss, kl_coef=0.5, kl_kind="k3", mode="token")
    loss, m = f(logp, old, ref, adv, mask)
    np.testing.assert_allclose(m["pg_loss"], 0.1, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], 0.3678794, rtol=1e-6)
    # KL is added to the loss (0.1 + 0.5 * 0.368 = 0.2839397), not subtracted or put in A.
    np.testing.assert_allclose(loss, 0.1 + 0.5 * 0.3678794, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], loss)
    assert {"clipfrac", "clipfrac_dual", "ratio_mean", "approx_kl"} <= m.keys()
    loss_k1, m1 = grpo.grpo_loss(logp, old, ref, adv, mask, kl_coef=0.5, kl_kind="k1")
    np.testing.assert_allclose([m1["kl"], loss_k1], [1.0, 0.6], rtol=1e-5)


# --- against plain numpy --------------------------------------------------------------------


def _np_logsumexp(x):
    mx = x.max(-1, keepdims=True)
    return (mx + np.log(np.exp(x - mx).sum(-1, keepdims=True)))[..., 0]


def _np_agg(x, m, mode):
    if mode == "token":
        return (x * m).sum() / m.sum()
    rows = [(x[b] * m[b]).sum() / m[b].sum() for b in range(x.shape[0]) if m[b].sum() > 0]
    return np.mean(rows)


def _np_kl(lp, ref, kind):
    if kind == "k1":
        return lp - ref
    if kind == "k2":
        return 0.5 * (lp - ref) ** 2
    d = np.clip(ref - lp, -20, 20)
    return np.clip(np.exp(d) - d - 1, -10, 10)


def _np_grpo(lp, old, ref, adv, m, cl, ch, dc, coef, kind, mode):
    a = adv[:, None]
    ratio = np.exp(np.clip(lp - old, -20, 20))
    pg1, pg2 = -a * ratio, -a * np.clip(ratio, 1 - cl, 1 + ch)
    clipped = np.maximum(pg1, pg2)
    pg = np.where(a < 0, np.minimum(clipped, -a * dc), clipped)
    pg_loss = _np_agg(pg, m, mode)
    kl = _np_agg(_np_kl(lp, ref, kind), m, mode)
    metrics = {
        "pg_loss": pg_loss,
        "kl": kl,
        "clipfrac": _np_agg((pg1 < pg2).astype(np.float64), m, "token"),
        "clipfrac_dual": _np_agg(((a < 0) & (clipped > -a * dc)).astype(np.float64), m, "token"),
        "ratio_mean": _np_agg(ratio, m, "token"),
        "approx_kl": _np_agg(-np.clip(lp - old, -20, 20), m, "token"),
    }
    return pg_loss + coef * kl, metrics


def test_logprobs_entropy_vs_reference():
    rng = np.random.default_rng(1)
    logits = (3 * rng.normal(size=(3, 5, 11))).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 5))
    x = logits.astype(np.float64)
    logp = x - _np_logsumexp(x)[..., None]
    want_lp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want_h = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(jax.jit(grpo.token_logprobs)(logits, targets), want_lp, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(grpo.entropy)(logits), want_h, rtol=1e-5)


@pytest.mark.parametrize("mode", ["token", "seq"])
def test_grpo_loss_vs_reference(mode):
    rng = np.random.default_rng(2)
    b, t = 6, 7
    lp = rng.normal(-2.0, 1.0, size=(b, t)).astype(np.float32)
    old = (lp + rng.normal(0, 1.0, size=(b, t))).astype(np.float32)  # ratios spread over the clips
    ref = (lp + rng.normal(0, 1.0, size=(b, t))).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    lengths = np.array([7, 1, 4, 0, 3, 6])  # unequal, one empty row
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    cfg = dict(clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.1)
    for kind in ("k1", "k2", "k3"):
        want_loss, want_m = _np_grpo(
            *(a.astype(np.float64) for a in (lp, old, ref, adv, mask)),
            cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"], cfg["kl_coef"], kind, mode,
        )  # fmt: skip
        loss, m = _jit(grpo.grpo_loss, kl_kind=kind, mode=mode, **cfg)(lp, old, ref, adv, mask)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=kind)
        for k, v in want_m.items():
            np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-7, err_msg=f"{kind} {k}")
    # The random draw exercises every branch (else the comparison proves little).
    assert 0 < want_m["clipfrac"] < 1 and want_m["clipfrac_dual"] > 0
