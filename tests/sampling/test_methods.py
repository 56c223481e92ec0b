"""The nucleus filter against a sort in numpy (the definition), on a Qwen-sized vocabulary."""

import jax
import numpy as np
import pytest

from emor3_jax.sampling.methods import top_p_filter


def _mass_before(logits: np.ndarray) -> np.ndarray:
    """[B, V]: the probability of the tokens before each one, most likely first (fp64)."""
    out = np.zeros(logits.shape)
    for b, row in enumerate(logits.astype(np.float64)):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        out[b, order] = np.cumsum(probs[order]) - probs[order]
    return out


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0, 30.0])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.95])
def test_top_p_keeps_the_nucleus_of_a_large_vocabulary(scale, p):
    logits = np.asarray(jax.random.normal(jax.random.key(int(scale * 10)), (3, 151_665))) * scale
    logits[1, :1000] = -np.inf  # banned tokens (logit bias) are never kept
    kept = np.isfinite(np.asarray(top_p_filter(logits, p)))
    before = _mass_before(logits)
    # fp32 sums may disagree with the fp64 ones only on a token whose mass before it is within
    # rounding of p; every other token is kept exactly when its mass before is < p
    sure = np.abs(before - p) > 2e-6
    np.testing.assert_array_equal(kept[sure], (before < p)[sure])
    assert sure.sum() >= logits.size - 9 and kept.any(axis=1).all()
    assert not kept[1, :1000].any()


def test_top_p_keeps_equally_likely_tokens_together():
    logits = np.array([[3.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.8)))
    # row 0: the top token holds ~0.70 < 0.8, so the next token crosses p; its two ties stay
    np.testing.assert_array_equal(kept, [[True, True, True, True, False], [True] * 5])
