"""The divergence guard's checks on numbers worked by hand: each healthy case passes, each
broken one is named, and a bound is a bound (just inside passes, just outside stops)."""

import dataclasses
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

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


# ---------------------------------------------------------------- the trainer's GRPO stop
def _first_response_token(exp) -> tuple[int, int, int]:
    """(micro-batch, row in it, position) of a response token (mask set) of the experience."""
    for i, (_, mask) in enumerate(exp.batches):
        rows, cols = np.nonzero(np.asarray(mask))
        if rows.size:
            return i, int(rows[0]), int(cols[0])
    raise AssertionError("no response token in the experience")


def _out_of_vocab(exp):
    tokens = exp.rollouts.tokens.copy()
    row = int(np.argmax(exp.rollouts.lengths > 0))
    tokens[row, 0] = -1  # one below the first id
    return dataclasses.replace(exp, rollouts=dataclasses.replace(exp.rollouts, tokens=tokens))


def _logprob(field, value):
    def corrupt(exp):
        i, r, j = _first_response_token(exp)
        values = list(getattr(exp, field))
        values[i] = values[i].at[r, j].set(value)
        return dataclasses.replace(exp, **{field: values})

    return corrupt


def _nan_advantages(exp):
    return dataclasses.replace(exp, advantages=np.full_like(exp.advantages, np.nan))


@pytest.mark.parametrize(
    "corrupt, why",
    [
        (_out_of_vocab, r"sampled 1 token ids outside the tokenizer's 0\.\.\d+ \(e\.g\. -1\)"),
        # -inf (not NaN) keeps the loss finite (the log-ratio is clamped): the guard, not the update, stops it.
        (_logprob("old_logp", -np.inf), r"non-finite old log-probs \(1 of \d+ tokens\)"),
        (_logprob("ref_logp", -5000.0), r"reference log-prob -5000 < -1000\.0 \(1 of \d+ tokens\)"),
        # With rl.max_skipped_steps=0 (below): the first skipped optimizer step stops the run.
        (_nan_advantages, r"non-finite loss nan or gradient norm nan, 1 optimizer steps in a row"),
    ],
    ids=["token_id", "old_logprob", "reference_logprob", "non_finite_update"],
)
def test_a_grpo_step_with_broken_outputs_stops_the_run_naming_it(tmp_path, monkeypatch, corrupt, why):
    """The trainer's GRPO step on crafted experience (the real step's, then broken in one
    place): each stops the run at GRPO step 1 naming what broke and the flag, before the step
    is saved (checkpoint.every=1 would save it)."""
    from test_train import small_config

    from emor3_jax import trainer
    from emor3_jax.rl.experience import GRPOStep

    real, calls = GRPOStep.experience, []

    def broken(self, params, ref, records, key):
        calls.append(key)
        return corrupt(real(self, params, ref, records, key))

    monkeypatch.setattr(GRPOStep, "experience", broken)
    flags = {"cold_start.steps": 0, "rl.steps": 2, "rl.max_skipped_steps": 0, "checkpoint.every": 1}
    c = small_config(tmp_path, **flags, **{"eval.num_examples": 2})
    with pytest.raises(FloatingPointError) as err:
        trainer.run(c)
    msg = str(err.value)
    assert re.match(r"grpo step 1: " + why, msg), msg
    assert msg.endswith(
        "stopped before saving the step (no checkpoint was saved; rerun with a lower --config.rl.learning_rate "
        "(now 5e-05))"
    ), msg
    assert len(calls) == 1  # stopped at the first step
    ckpt = tmp_path / "ckpt"
    assert not ckpt.exists() or not [n for n in os.listdir(ckpt) if n.isdigit()], os.listdir(ckpt)
