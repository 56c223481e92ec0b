"""The divergence guard's checks on numbers worked by hand: each healthy case passes, each
broken one is named, and a bound is a bound (just inside passes, just outside stops)."""

import jax.numpy as jnp
import numpy as np

from emor3_jax.rl import divergence


def test_param_norm_is_the_global_l2_norm_of_float_leaves():
    # sqrt(3^2 + 4^2 + 12^2) = 13; the int leaf is not a parameter (a per-leaf sum would give 3+4+12).
    tree = {"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.array([[12.0]], jnp.bfloat16)}, "n": jnp.array([7])}
    assert float(divergence.param_norm(tree)) == 13.0


def test_norm_ratio_stops_a_blown_up_or_collapsed_step_only():
    assert divergence.norm_ratio(10.0, 10.1, 2.0) is None
    assert divergence.norm_ratio(10.0, 19.9, 2.0) is None
    assert "x2.01 > 2.0" in divergence.norm_ratio(10.0, 20.1, 2.0)
    assert "x2.01 > 2.0" in divergence.norm_ratio(20.1, 10.0, 2.0)  # shrinking counts as much as growing
    assert "10 -> 1e+07" in divergence.norm_ratio(10.0, 1e7, 2.0)  # lr=1e6: finite, but blown up
    assert "non-finite" in divergence.norm_ratio(10.0, float("inf"), 2.0)
    assert "non-finite" in divergence.norm_ratio(10.0, float("nan"), 2.0)
    assert divergence.norm_ratio(10.0, 0.0, 2.0) is not None


def test_logprobs_reads_only_response_tokens():
    values = [np.array([[-1.0, -2.0, -5000.0]]), np.array([[-0.5, np.nan]])]
    masks = [np.array([[1, 1, 0]]), np.array([[1, 0]])]  # the -5000 and the NaN are padding
    assert divergence.logprobs("old", values, masks, -1000.0) is None
    masks = [np.array([[1, 1, 1]]), np.array([[1, 0]])]
    assert divergence.logprobs("old", values, masks, -1000.0) == "old log-prob -5000 < -1000.0 (1 of 4 tokens)"
    masks = [np.array([[1, 1, 0]]), np.array([[1, 1]])]
    assert divergence.logprobs("reference", values, masks, -1000.0) == (
        "non-finite reference log-probs (1 of 4 tokens)"
    )
    assert divergence.logprobs("old", values, [np.zeros((1, 3)), np.zeros((1, 2))], -1000.0) is None


def test_token_ids_outside_the_tokenizer_are_named():
    tokens = np.array([[5, 9, 10], [0, -3, 99]])
    assert divergence.token_ids(tokens, np.array([2, 1]), vocab=10) is None  # 10, -3, 99 lie past the lengths
    assert divergence.token_ids(tokens, np.array([3, 1]), vocab=10) == (
        "sampled 1 token ids outside the tokenizer's 0..9 (e.g. 10)"
    )
    assert "sampled 2 token ids" in divergence.token_ids(tokens, np.array([2, 2]), vocab=9)  # 9 and -3
