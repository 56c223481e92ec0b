"""Advantage estimators on hand-worked numbers, then against plain numpy on random rewards."""

import functools

import jax
import numpy as np
import pytest

from emor3_jax.rl import advantages as adv_lib

EPS = 1e-6


def _jit(fn, **static):
    return jax.jit(functools.partial(fn, **static))


def test_grpo_n2_unbiased_std():
    # Groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.70710678,
    # A = +-0.5 / (0.70710678 + 1e-6) = +-0.7071058. The biased std (0.5) would give +-1.
    a = _jit(adv_lib.grpo_advantages, n=2)(np.array([1.0, 0.0, 0.0, 1.0], np.float32))
    np.testing.assert_allclose(a, [0.7071058, -0.7071058, -0.7071058, 0.7071058], rtol=1e-6)


def test_grpo_n4_unbiased_std():
    # One group [1, 0, 0, 1]: mean 0.5, var = 4 * 0.25 / 3 = 1/3, std 0.57735027,
    # A = +-0.5 / 0.57735127 = +-0.8660239. Biased std 0.5 would give +-1.
    a = _jit(adv_lib.grpo_advantages, n=4)(np.array([1.0, 0.0, 0.0, 1.0], np.float32))
    np.testing.assert_allclose(a, [0.8660239, -0.8660239, -0.8660239, 0.8660239], rtol=1e-6)
    # [3, 0, 0, 1]: mean 1, deviations [2, -1, -1, 0], var 6 / 3 = 2, std 1.4142136.
    a = _jit(adv_lib.grpo_advantages, n=4)(np.array([3.0, 0.0, 0.0, 1.0], np.float32))
    np.testing.assert_allclose(a, [1.4142126, -0.7071063, -0.7071063, 0.0], rtol=1e-6, atol=1e-7)


def test_grpo_constant_group_is_zero_not_nan():
    # std 0: (1 - 1) / (0 + 1e-6) = 0. Without eps this would be 0/0 = NaN.
    a = _jit(adv_lib.grpo_advantages, n=2)(np.array([1.0, 1.0, 0.0, 1.0], np.float32))
    np.testing.assert_allclose(a, [0.0, 0.0, -0.7071058, 0.7071058], rtol=1e-6)


def test_groups_are_consecutive_rows():
    # [1, 0, 0, 1] with n=2 pairs rows (0, 1) and (2, 3). Strided grouping (rows 0, 2 and
    # 1, 3) would see groups [1, 0] and [0, 1] too, so use [1, 1, 0, 0]: consecutive groups
    # are constant (A = 0); strided ones would give +-0.707.
    a = _jit(adv_lib.grpo_advantages, n=2)(np.array([1.0, 1.0, 0.0, 0.0], np.float32))
    np.testing.assert_allclose(a, [0.0, 0.0, 0.0, 0.0])


def test_drgrpo_no_std_division():
    # [3, 0, 0, 1], n=4: mean 1 -> [2, -1, -1, 0]. GRPO would give [1.414, -0.707, ...].
    a = _jit(adv_lib.drgrpo_advantages, n=4)(np.array([3.0, 0.0, 0.0, 1.0], np.float32))
    np.testing.assert_allclose(a, [2.0, -1.0, -1.0, 0.0])


def test_rloo_leave_one_out():
    # [3, 0, 0, 1], n=4: baselines (0+0+1)/3, (3+0+1)/3, (3+0+1)/3, (3+0+0)/3
    # -> A = [3 - 1/3, -4/3, -4/3, 1 - 1] = [2.6667, -1.3333, -1.3333, 0].
    # A baseline including r_i itself (the group mean) would give [2, -1, -1, 0].
    a = _jit(adv_lib.rloo_advantages, n=4)(np.array([3.0, 0.0, 0.0, 1.0], np.float32))
    np.testing.assert_allclose(a, [8 / 3, -4 / 3, -4 / 3, 0.0], rtol=1e-6, atol=1e-7)


def test_compute_advantages_dispatch():
    r = np.array([3.0, 0.0, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(adv_lib.compute_advantages(r, 4, "drgrpo"), [2.0, -1.0, -1.0, 0.0])
    np.testing.assert_allclose(adv_lib.compute_advantages(r, 4, "rloo"), [8 / 3, -4 / 3, -4 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(adv_lib.compute_advantages(r, 4, "grpo")[0], 1.4142126, rtol=1e-6)
    with pytest.raises(ValueError, match="ppo"):
        adv_lib.compute_advantages(r, 4, "ppo")


@pytest.mark.parametrize("fn", [adv_lib.grpo_advantages, adv_lib.drgrpo_advantages, adv_lib.rloo_advantages])
def test_bad_group_sizes_raise(fn):
    r = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match=">= 2"):  # n == 1: no baseline (EasyR1 asserts n > 1)
        fn(r, 1)
    with pytest.raises(ValueError, match="groups of n=4"):
        fn(r, 4)
    with pytest.raises(ValueError, match=r"\[R\]"):
        fn(r.reshape(2, 3), 3)


def test_advantages_vs_reference():
    rng = np.random.default_rng(0)
    n, groups = 8, 5
    r = rng.normal(size=groups * n).astype(np.float32)
    r[8:16] = 0.5  # one constant group

    want = {}
    g = r.astype(np.float64).reshape(groups, n)
    mean = g.mean(1, keepdims=True)
    want["grpo"] = ((g - mean) / (g.std(1, ddof=1, keepdims=True) + EPS)).ravel()
    want["drgrpo"] = (g - mean).ravel()
    loo = np.empty_like(g)
    for b in range(groups):
        for i in range(n):
            loo[b, i] = g[b, i] - np.mean(np.delete(g[b], i))
    want["rloo"] = loo.ravel()

    for est, expected in want.items():
        got = _jit(adv_lib.compute_advantages, n=n, estimator=est)(r)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=est)
