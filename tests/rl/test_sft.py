"""The cold start's step on its own (rl/sft.py), on a tiny random model with a scripted task
(fixed token rows): its loss is the masked token-mean cross-entropy computed here from the
model's full logits, and with plain SGD at lr 1 one step moves the params by minus the
jax.grad of that loss (plus the judge batch's, when there is one); a non-finite loss stops it
naming the step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from emor3_jax.core import sharding
from emor3_jax.models.api import create_model, preset
from emor3_jax.rl.learner import Learner
from emor3_jax.rl.sft import SFTSettings, SFTStep

PAD = 0
# Three SET rows of 5, 3 and 7 tokens whose last 2, 1 and 3 are the answer (6 answer tokens):
# padded to the bucket 8, so the rows' padding differs.
RECORDS = [
    {"ids": [5, 6, 7, 8, 9], "answer": 2},
    {"ids": [10, 11, 12], "answer": 1},
    {"ids": [13, 14, 15, 16, 17, 18, 19], "answer": 3},
]
BUCKETS = (8, 12)


class ScriptedEncoder:
    def __init__(self, cfg):
        self.cfg = cfg


class ScriptedTask:
    """SFT examples (ids [T], answer mask [T], no image) straight from the records; the judge's
    questions are 4-token rows (the last token the answer) that depend on the step."""

    def sft_example(self, encoder, record):
        return _example(record["ids"], record["answer"])

    def judge_sft_examples(self, encoder, records, seed, count):
        return [_example([30 + seed + j, 31, 32 + j, 40 + seed], 1) for j in range(count)]


def _example(ids, answer):
    mask = np.zeros(len(ids), bool)
    mask[-answer:] = True
    return np.array(ids, np.int32), mask, None, None


def _padded(examples, length):
    """Hand-made right-padded ids [R, T] and the answer-token mask [R, T]."""
    ids, mask = np.full((len(examples), length), PAD, np.int32), np.zeros((len(examples), length), bool)
    for i, (e_ids, e_mask, _, _) in enumerate(examples):
        ids[i, : len(e_ids)], mask[i, : len(e_mask)] = e_ids, e_mask
    return ids, mask


def _setup(judge_batch_size, tx):
    cfg = preset("tiny", vocab_size=64, param_dtype="float32", compute_dtype="float32")
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:1])
    graphdef, params = nnx.split(create_model(cfg, mesh, sharding.DEFAULT_RULES, seed=0))
    step = SFTStep(
        learner=Learner(graphdef, tx),
        encoder=ScriptedEncoder(cfg),
        task=ScriptedTask(),
        settings=SFTSettings(buckets=BUCKETS, judge_batch_size=judge_batch_size),
        pad_id=PAD,
    )
    return mesh, graphdef, params, step


def _nll(graphdef, params, ids, mask):
    """Token-mean cross-entropy of the tokens `mask` marks, each predicted from the tokens
    before it, from the model's full logits [R, T, V] (no chunking, no Learner)."""
    model = nnx.merge(graphdef, params)
    real = (ids != PAD).astype(jnp.int32)  # rows are right-padded; PAD is never a real token here
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), (3, *ids.shape))  # text only: t on every axis
    logp = jax.nn.log_softmax(model(ids, positions, real)[:, :-1], axis=-1)  # [R, T-1, V]
    token = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [R, T-1]
    target = mask[:, 1:]
    return -(token * target).sum() / target.sum()


@pytest.mark.parametrize("judge_batch_size", [0, 2])
def test_one_step_is_sgd_on_the_masked_token_cross_entropy(judge_batch_size):
    """SGD at lr 1: params_after = params - grad(SET loss [+ judge loss]). A loss over every
    token (not the answer's), a mean over rows, or a judge batch merged into the SET rows'
    token mean (its 2 tokens would weigh 2/8, not 1) moves them elsewhere."""
    mesh, graphdef, params, step = _setup(judge_batch_size, optax.sgd(1.0))
    set_ids, set_mask = _padded([_example(r["ids"], r["answer"]) for r in RECORDS], 8)
    judge_examples = ScriptedTask().judge_sft_examples(None, RECORDS, 3, judge_batch_size)
    losses = [(set_ids, set_mask)] + ([_padded(judge_examples, 8)] if judge_batch_size else [])
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        want = [float(_nll(graphdef, params, ids, m)) for ids, m in losses]
        total = lambda p: sum(_nll(graphdef, p, ids, m) for ids, m in losses)
        grads = jax.tree.map(np.asarray, jax.grad(total)(params))
        before = jax.tree.map(np.asarray, params)  # apply donates the params
        new, _, metrics = step.update(params, step.learner.init(params), RECORDS, step=3)
    assert metrics["loss"] == pytest.approx(want[0], rel=1e-5)
    assert metrics["tokens"] == 6  # the answer tokens: 2 + 1 + 3
    assert metrics["grad_norm"] == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)
    if judge_batch_size:
        assert metrics["judge_loss"] == pytest.approx(want[1], rel=1e-5)
    else:
        assert "judge_loss" not in metrics
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4  # the gradient is not zero
    for got, old, g in zip(jax.tree.leaves(new), jax.tree.leaves(before), jax.tree.leaves(grads)):
        # atol: a few float32 ulps of the params (the move is new - old params)
        np.testing.assert_allclose(np.asarray(got) - old, -g, rtol=1e-4, atol=5e-7)


def test_the_batches_are_the_records_right_padded_to_a_bucket():
    """The step's SET batch holds each record's ids padded to 8 (the smaller bucket that fits 7)
    and masks the next-token targets that are answer tokens [R, T-1]; the judge batch comes
    from the task's questions drawn by the step."""
    _, _, _, step = _setup(2, optax.sgd(1.0))
    batch, loss_mask = step.set_batch(RECORDS)
    ids, mask = _padded([_example(r["ids"], r["answer"]) for r in RECORDS], 8)
    np.testing.assert_array_equal(np.asarray(batch.input_ids), ids)
    np.testing.assert_array_equal(np.asarray(batch.attention_mask), (ids != PAD).astype(np.int32))
    np.testing.assert_array_equal(loss_mask, mask[:, 1:].astype(np.float32))
    judge, judge_mask = step.judge_batch(RECORDS, step=5)
    assert np.asarray(judge.input_ids)[:, 0].tolist() == [35, 36] and judge_mask.sum() == 2


def test_a_non_finite_loss_stops_the_step_naming_it():
    mesh, _, params, step = _setup(0, optax.sgd(1.0))
    broken = jax.tree.map(lambda x: x * jnp.nan, params)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        with pytest.raises(
            FloatingPointError, match=r"cold_start step 4: non-finite \{'loss': nan, 'grad_norm': nan\}"
        ):
            step.update(broken, step.learner.init(broken), RECORDS, step=4)
