"""The GRPO step in pieces (rl/experience.py), with a scripted sampler (fixed responses) and a
scripted task (fixed rewards), on a tiny random model: gradient accumulation over micro-batches
equals one big batch in each loss mode, the optimizer state is threaded through the update, a
reward component a task adds comes back from the step and lands in the trainer's metrics, and
a rollout copy of the policy is made fresh for each step and gone before its update."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from emor3_jax.core import sharding
from emor3_jax.core.batches import Prompt
from emor3_jax.models.api import create_model
from emor3_jax.rl import reference, rollout_weights
from emor3_jax.rl.experience import GRPOStep, StepSettings
from emor3_jax.rl.learner import GRPOSettings, Learner, OptimizerSettings, make_optimizer
from emor3_jax.rl.rows import training_rows
from emor3_jax.sampling.methods import GREEDY, SamplingParams
from emor3_jax.sampling.sampler import Samples

B, N, G, PAD = 4, 2, 6, 0
VISION_IDS = range(60, 64)  # the tiny preset's image, video, vision start and end ids at vocab 64
LENGTHS = np.array([1, 6, 3, 5, 2, 6, 4, 1])  # [R]: different lengths, so token and row weights differ


class ScriptedSampler:
    """Returns the same tokens for every call: row r is r+10, r+11, ... cut at LENGTHS[r]."""

    def generate(self, model, prompts, *, key, max_new_tokens, n, params):
        rows = len(prompts) * n
        tokens = np.full((rows, G), PAD, np.int32)
        for r in range(rows):
            tokens[r, : LENGTHS[r]] = np.arange(LENGTHS[r]) + 10 + r
        return Samples(
            tokens=jax.numpy.asarray(tokens),
            logprobs=jax.numpy.zeros((rows, G)),
            lengths=jax.numpy.asarray(LENGTHS[:rows]),
            done=jax.numpy.ones((rows,), bool),
        )


class ScriptedEncoder:
    def __init__(self, cfg):
        self.cfg = cfg

    def decode(self, tokens, lengths):
        return [" ".join(map(str, row[:n])) for row, n in zip(tokens, lengths)]


@dataclasses.dataclass(frozen=True)
class ScriptedTask:
    """Reward = response length / 10, plus a "brevity" component the trainer has never heard of."""

    reflects: bool = False
    judge: str = "policy"

    def prompt(self, encoder, record):
        return Prompt(np.array(record["ids"], np.int32))

    def score(self, response, label, text_answer, image_answer):
        n = len(response.split())
        return {"overall": n / 10, "brevity": float(n <= 2)}


def _setup(
    micro_batch, loss_mode, tx=None, devices=1, sampler=None, stop_ids=(), task=None, groups=1, **settings_fields
):
    """(mesh, learner, params, step, records) of a tiny random model (vocab 64) on `devices`,
    plain SGD at lr 1 unless `tx`, the scripted sampler unless `sampler` (built from the model
    config: a real one, which never samples the image / video / vision ids 60..63 and stops
    at `stop_ids`), ScriptedTask unless `task`; the loss in `groups` row groups;
    settings_fields override StepSettings (recompute_old_logprobs=True)."""
    from emor3_jax.models.api import preset

    cfg = preset("tiny", vocab_size=64, param_dtype="float32", compute_dtype="float32")
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:devices])
    graphdef, params = nnx.split(create_model(cfg, mesh, sharding.DEFAULT_RULES, seed=0))
    settings = StepSettings(
        num_generations=N,
        advantage="grpo",
        max_response_len=G,
        rollout=SamplingParams(temperature=1.0),
        micro_batch=micro_batch,
        update_batch=B,
        prompt_buckets=(8,),
        loss=GRPOSettings(
            clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.1, kl_kind="k3", loss_mode=loss_mode, groups=groups
        ),
        **{"recompute_old_logprobs": True, **settings_fields},
    )
    learner = Learner(graphdef, tx or optax.sgd(1.0))
    step = GRPOStep(
        learner=learner,
        sampler=sampler(cfg).with_stops(stop_ids, {i: -1e9 for i in VISION_IDS}) if sampler else ScriptedSampler(),
        encoder=ScriptedEncoder(cfg),
        task=task or ScriptedTask(),
        settings=settings,
        pad_id=PAD,
        threads=1,
    )
    records = [{"id": str(b), "label": "x", "ids": list(range(1, 3 + b))} for b in range(B)]
    return mesh, learner, params, step, records


@pytest.mark.parametrize("loss_mode", ["token", "seq"])
def test_micro_batches_accumulate_to_the_gradient_of_one_big_batch(loss_mode):
    """With plain SGD at lr 1, params_after = params - grad: the update over 4 micro-batches of
    2 rows must move the params exactly as one micro-batch of all 8 rows (a weighting by rows
    in token mode, or by tokens in seq mode, fails this: the rows have 1 to 6 tokens)."""
    moved = {}
    for micro in (B * N, 2):
        mesh, learner, params, step, records = _setup(micro, loss_mode)
        ref = jax.tree.map(lambda x: x + 0.01, params)  # a reference that differs, so the KL term has a gradient
        with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
            exp = step.experience(params, ref, records, jax.random.key(0))
            assert len(exp.batches) == B * N // micro
            before = jax.tree.map(np.asarray, params)  # apply donates the params
            new, _, metrics = step.update(params, learner.init(params), exp, step=1)
        moved[micro] = jax.tree.map(lambda a, b: np.asarray(a) - b, new, before)
        step.close()
    flat_big, flat_small = jax.tree.leaves(moved[B * N]), jax.tree.leaves(moved[2])
    assert max(float(np.abs(a).max()) for a in flat_big) > 1e-6  # the gradient is not zero
    for a, b in zip(flat_big, flat_small):
        # atol: two float32 ulps of a parameter of magnitude ~1 (the move is new - old params)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2.5e-7)


def test_packed_rows_give_the_update_and_log_probs_of_padded_rows():
    """rl.packing through the whole step on 8 devices: each micro-batch's 4 rows (3 to 11
    tokens) spread over the 8 data-parallel shards (4 of them left with an empty pack of 16
    tokens) give the padded rows' reference and old log-probs and move the params as they do
    (SGD at lr 1: the move is the gradient)."""
    moved, logp = {}, {}
    for packing in (False, True):
        mesh, learner, params, step, records = _setup(4, "token", devices=8, packing=packing, pack_length=16)
        ref = jax.tree.map(lambda x: x + 0.01, params)
        with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
            exp = step.experience(params, ref, records, jax.random.key(0))
            assert all(type(b).__name__ == ("PackedBatch" if packing else "SequenceBatch") for b, _ in exp.batches)
            logp[packing] = [np.asarray(x) * m for x, (_, m) in zip(exp.ref_logp + exp.old_logp, exp.batches * 2)]
            before = jax.tree.map(np.asarray, params)
            new, _, _ = step.update(params, learner.init(params), exp, step=1)
        moved[packing] = jax.tree.map(lambda a, b: np.asarray(a) - b, new, before)
        step.close()
    for a, b in zip(logp[False], logp[True]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(a).max()) for a in jax.tree.leaves(moved[False])) > 1e-6
    for a, b in zip(jax.tree.leaves(moved[False]), jax.tree.leaves(moved[True])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2.5e-7)


def test_equal_micro_batch_weighting_averages_each_micro_batchs_own_mean():
    """ "equal" (the official run's accumulation): with SGD at lr 1 the move is
    -(1/4) * sum_i grad(token mean of micro-batch i) over the 4 micro-batches of 2 rows; the
    rows have 1 to 6 tokens, so this differs from "by_share" (the mini-batch's token mean)."""
    moved, grad_sums = {}, None
    for weighting in ("by_share", "equal"):
        mesh, learner, params, step, records = _setup(2, "token", micro_batch_weighting=weighting)
        ref = jax.tree.map(lambda x: x + 0.01, params)
        with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
            exp = step.experience(params, ref, records, jax.random.key(0))
            if weighting == "equal":  # each micro-batch's own token-mean loss, weight 1
                for i, (batch, mask) in enumerate(exp.batches):
                    adv = exp.advantages[exp.micro[i]]
                    args = (exp.old_logp[i], exp.ref_logp[i], adv, mask, 1.0, step.s.loss)
                    g, _ = learner.grpo_grads(params, batch, exp.p_len - 1, exp.g_len, *args)
                    g = jax.tree.map(np.asarray, g)
                    grad_sums = g if grad_sums is None else jax.tree.map(np.add, grad_sums, g)
            before = jax.tree.map(np.asarray, params)
            new, _, _ = step.update(params, learner.init(params), exp, step=1)
        moved[weighting] = jax.tree.map(lambda a, b: np.asarray(a) - b, new, before)
        step.close()
    for got, g in zip(jax.tree.leaves(moved["equal"]), jax.tree.leaves(grad_sums)):
        np.testing.assert_allclose(got, -g / 4, rtol=1e-4, atol=2.5e-7)
    gap = max(float(np.abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, moved.values())))
    assert gap > 1e-5  # the two weightings differ on rows of unequal length


# (2, 4, False) is slow-marked (~22 s of CI): (2, 4, True) takes the same 2-device path packed.
@pytest.mark.parametrize(
    "devices, micro, packing", [pytest.param(2, 4, False, marks=pytest.mark.slow), (2, 4, True), (1, 2, False)]
)
def test_per_device_mean_is_easyr1s_loss_over_2_devices_and_2_micro_batches(devices, micro, packing):
    """per_device_mean for 2 official devices, 2 rows per device per micro-batch, one optimizer
    step of 8 rows, on our mesh of `devices` in micro-batches of `micro` rows. EasyR1's loss
    (dp_actor.py:240-276: on each GPU, per micro-batch, the token mean of pg + kl_coef * kl over
    its rows, divided by the 64 / 4 -> here 4 / 2 = 2 accumulation steps; FSDP averages the 2
    GPUs' gradients) is
      L = (1/2) sum_devices (1/2) sum_micro (sum_{rows r of the group} n_r * tm_r) / n_group,
    tm_r the token mean of row r's per-token loss, n_r its response tokens (LENGTHS). The groups,
    from rows of 3, 8, 6, 8, 6, 10, 9, 6 tokens (prompt + response) spread over the 2 devices as
    tests/rl/test_balance.py works out by hand: device 0 {1, 2} then {4, 6}, device 1 {0, 3}
    then {5, 7}. With SGD at lr 1 the move is -grad L = -sum_r w_r grad tm_r, w_r = n_r /
    (4 n_group), each grad tm_r from the row alone, whatever our mesh and micro-batch size.
    The by_share weights n_r / 32 differ."""
    mesh, learner, params, step, records = _setup(
        micro,
        "token",
        devices=devices,
        groups=micro // 2,
        micro_batch_weighting="per_device_mean",
        loss_devices=2,
        packing=packing,
        pack_length=16,
    )
    ref = jax.tree.map(lambda x: x + 0.01, params)
    by_hand = [[1, 2], [0, 3], [4, 6], [5, 7]]  # (micro-batch 0: device 0, device 1), (micro-batch 1: ...)
    weights = np.zeros(B * N)
    for rows in by_hand:
        weights[rows] = LENGTHS[rows] / (2 * 2 * LENGTHS[rows].sum())
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        exp = step.experience(params, ref, records, jax.random.key(0))
        laid_out = [by_hand[0] + by_hand[1], by_hand[2] + by_hand[3]] if micro == 4 else by_hand
        assert [m.tolist() for m in exp.micro] == laid_out
        row_grads = []
        for r in range(B * N):
            i, pos = next((i, list(m).index(r)) for i, m in enumerate(exp.micro) if r in m)
            batch, mask, p_len, g_len = training_rows(exp.rollouts, step.encoder.cfg, PAD, (8,), np.array([r]))
            old, old_ref = (np.asarray(x[i])[pos : pos + 1] for x in (exp.old_logp, exp.ref_logp))
            single = dataclasses.replace(step.s.loss, groups=1)
            args = (old, old_ref, exp.advantages[[r]], mask, 1.0, single)
            g, _ = learner.grpo_grads(params, batch, p_len - 1, g_len, *args)
            row_grads.append(jax.tree.map(np.asarray, g))
        before = jax.tree.map(np.asarray, params)
        new, _, _ = step.update(params, learner.init(params), exp, step=1)
    step.close()
    combine = lambda w: jax.tree.map(lambda *gs: -sum(wi * gi for wi, gi in zip(w, gs)), *row_grads)
    moved = jax.tree.map(lambda a, b: np.asarray(a) - b, new, before)
    for got, want in zip(jax.tree.leaves(moved), jax.tree.leaves(combine(weights))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2.5e-7)
    by_share = combine(LENGTHS / LENGTHS.sum())
    gap = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(by_share)))
    assert gap > 1e-5


def test_per_device_mean_settings_and_the_shapes_they_refuse():
    """3b: micro-batches of 8 rows hold 2 loss groups of the official 4 rows, spread over the
    official 8 devices; 3 devices x 4 rows do not divide the 2,048 rows of an optimizer step:
    refused naming the flags (by_share has no groups)."""
    from configs.qwen_vl import get_config

    c = get_config("3b")
    s = StepSettings.from_config(c)
    assert (s.micro_batch, s.loss.groups, s.group_rows, s.loss_devices) == (8, 2, 4, 8)
    c.rl.loss_devices = 3
    with pytest.raises(ValueError, match=r"--config.rl.loss_devices=3 x --config.rl.micro_batch_per_device=4 must"):
        StepSettings.from_config(c)
    c.rl.micro_batch_weighting = "by_share"
    s = StepSettings.from_config(c)
    assert (s.micro_batch, s.loss.groups, s.loss_devices) == (8, 1, 1)
    with pytest.raises(ValueError, match="loss.groups=2, loss_devices=1 need micro_batch_weighting='per_device_mean'"):
        dataclasses.replace(s, loss=dataclasses.replace(s.loss, groups=2))


def test_a_non_finite_gradient_skips_the_step_then_stops_the_run_past_the_limit():
    """NaN advantages make the loss and every gradient NaN: the update skips the optimizer
    step (params and AdamW's counter unchanged, skipped_steps = 1); a finite update resets the
    count; with max_skipped_steps = 1 the second skip in a row stops the run naming the step."""
    tx, _ = make_optimizer(OptimizerSettings.constant(1e-3))
    mesh, learner, params, step, records = _setup(2, "token", tx, max_skipped_steps=1)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        good = step.experience(params, params, records, jax.random.key(0))
        bad = dataclasses.replace(good, advantages=np.full_like(good.advantages, np.nan))
        before = jax.tree.map(np.asarray, params)
        p1, opt1, m1 = step.update(params, learner.init(params), bad, step=1)
        assert m1["skipped_steps"] == 1 and not np.isfinite(m1["loss"])
        assert _adam_count(opt1) == 0
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(before)):
            np.testing.assert_array_equal(np.asarray(a), b)
        p2, opt2, m2 = step.update(p1, opt1, good, step=2)  # finite: applied, the count resets
        assert m2["skipped_steps"] == 0 and _adam_count(opt2) == 1
        p3, opt3, m3 = step.update(p2, opt2, bad, step=3)  # one in a row: tolerated
        assert m3["skipped_steps"] == 1
        with pytest.raises(FloatingPointError, match=r"grpo step 4: non-finite .* 2 optimizer steps in a row"):
            step.update(p3, opt3, bad, step=4)
    step.close()


def _adam_count(opt) -> int:
    return int(np.asarray(opt[1][0].count))  # chain(clip, adamw): AdamW's step counter


def test_optimizer_state_is_threaded_through_not_smuggled():
    tx, _ = make_optimizer(OptimizerSettings.constant(1e-3))
    mesh, learner, params, step, records = _setup(2, "token", tx)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        opt = learner.init(params)
        exp = step.experience(params, params, records, jax.random.key(0))
        p1, opt1, metrics = step.update(params, opt, exp, step=1)
        count1 = _adam_count(opt1)  # read before the next update donates opt1
        p1_again = jax.tree.map(jnp.copy, p1)  # apply donates its inputs
        fresh = learner.init(p1)
        p2, opt2, _ = step.update(p1, opt1, exp, step=2)
        # The same second update from a fresh optimizer state moves the params differently:
        # the state handed in is the one used.
        p2_fresh, _, _ = step.update(p1_again, fresh, exp, step=2)
    step.close()
    assert count1 == 1 and _adam_count(opt2) == 2  # one optimizer step per update (update_batch = B)
    assert all(isinstance(v, float) for v in metrics.values())  # metrics are numbers, no state inside
    diff = max(float(np.abs(np.asarray(a - b)).max()) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p2_fresh)))
    assert diff > 0


def test_experience_returns_every_reward_component_the_task_scores():
    mesh, learner, params, step, records = _setup(2, "token")
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        exp = step.experience(params, params, records, jax.random.key(0))
    step.close()
    assert list(exp.rewards) == ["overall", "brevity"]
    np.testing.assert_allclose(exp.rewards["overall"], LENGTHS / 10, rtol=1e-6)
    np.testing.assert_array_equal(exp.rewards["brevity"], (LENGTHS <= 2).astype(np.float32))
    # GRPO with n = 2: each pair's rewards a, b give A = sign(a - b) / sqrt(2) (mean (a+b)/2,
    # unbiased std |a - b| / sqrt(2)); the pairs' lengths are (1, 6), (3, 5), (2, 6), (4, 1).
    want = np.array([-1, 1, -1, 1, -1, 1, 1, -1]) / np.sqrt(2)
    np.testing.assert_allclose(exp.advantages, want, rtol=1e-4)


def test_a_bf16_reference_gives_the_fp32_ones_log_probs_to_bf16_rounding():
    """What rl.reference_dtype=bfloat16 changes: the reference log-probs (and so the KL term) by
    the weights' rounding only, far less than the policy moves in a step."""
    mesh, _, params, step, records = _setup(2, "token")
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        full = step.experience(params, reference.copy(params, "float32"), records, jax.random.key(0))
        half = step.experience(params, reference.copy(params, "bfloat16"), records, jax.random.key(0))
    step.close()
    for f, h, (_, mask) in zip(full.ref_logp, half.ref_logp, full.batches):
        f, h, m = np.asarray(f), np.asarray(h), np.asarray(mask, bool)
        assert 0 < np.abs(f - h)[m].max() < 0.05, np.abs(f - h)[m].max()  # rounded, not another model
    for f, h in zip(full.old_logp, half.old_logp):  # the policy's own log-probs do not change
        np.testing.assert_array_equal(np.asarray(f), np.asarray(h))


def test_a_task_component_lands_in_the_trainers_metrics(tmp_path, monkeypatch):
    """The trainer logs whatever components the task returns: a task that adds one (here
    through the EMO-R3 task's score) needs no change to the trainer."""
    from test_train import small_config

    from emor3_jax import run_setup, trainer
    from emor3_jax.emo_r3.task import EmoR3

    class WithLength(EmoR3):
        def score(self, response, label, text_answer, image_answer):
            return {**super().score(response, label, text_answer, image_answer), "chars": float(len(response))}

    monkeypatch.setattr(run_setup, "EmoR3", WithLength)
    trainer.run(small_config(tmp_path, **{"cold_start.steps": 0, "rl.steps": 1, "eval.num_examples": 2}))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        grpo = [json.loads(line) for line in f if '"phase": "grpo"' in line]
    assert len(grpo) == 1 and grpo[0]["reward_chars"] > 0
    assert {"reward_overall", "reward_accuracy", "reward_format"} <= set(grpo[0])


@pytest.mark.parametrize("recompute", [False, True])
def test_first_update_has_ratio_one_and_nothing_clipped(recompute):
    """Responses sampled by the real sampler, then the first update from the same params: the
    policy that trains is the policy that sampled, so every token's ratio is 1 and nothing is
    clipped, whether the old log-probs come from the sampler (the tiny config) or are
    recomputed by the learner (the real variants, rl.recompute_old_logprobs). A learner that
    scores other tokens than the sampler drew (a shifted position, a prompt token dropped,
    another policy's log-probs) moves ratio_mean and approx_kl and, with advantages of +-0.7,
    clips. The sampler's log-probs also equal the learner's token by token."""
    from emor3_jax.sampling.sampler import Sampler

    real = lambda cfg: Sampler(cfg, prompt_buckets=(8,), gen_buckets=(G,), pad_id=PAD)
    # Half the vocabulary stops a row: lengths of 1 to 6 tokens, so the rewards (length / 10)
    # and the advantages differ from 0.
    stops = tuple(range(32, 60))
    mesh, learner, params, step, records = _setup(
        B * N, "token", sampler=real, stop_ids=stops, recompute_old_logprobs=recompute
    )
    ref = jax.tree.map(lambda x: x + 0.01, params)  # another policy: its log-probs are not the old ones
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        exp = step.experience(params, ref, records, jax.random.key(3))
        (batch, mask), lengths = exp.batches[0], np.asarray(exp.rollouts.lengths)
        assert len(set(lengths.tolist())) > 2 and np.abs(exp.advantages).max() > 0.5, (lengths, exp.advantages)
        learner_logp = np.asarray(learner.logprobs(params, batch, exp.p_len - 1, exp.g_len))
        sampler_logp = np.asarray(exp.rollouts.old_logp)
        np.testing.assert_allclose(sampler_logp * mask, learner_logp * mask, atol=1e-4)
        _, _, metrics = step.update(params, learner.init(params), exp, step=1)
    step.close()
    assert metrics["clipfrac"] == 0.0 and metrics["clipfrac_dual"] == 0.0, metrics
    assert abs(metrics["ratio_mean"] - 1.0) < 1e-5, metrics
    assert abs(metrics["approx_kl"]) < 1e-5, metrics


@dataclasses.dataclass(frozen=True)
class OneTokenTask(ScriptedTask):
    """Reward 1 for a response that stops at once (its first token is a stop id), else 0."""

    def score(self, response, label, text_answer, image_answer):
        return {"overall": float(len(response.split()) == 1)}


def test_grpo_steps_raise_the_reward():
    """GRPO learns: 12 steps (AdamW at lr 3e-2, the real sampler, old log-probs from it) on a
    task that rewards stopping at once raise the share of one-token responses to 16 fresh
    prompts from the random model's (0.31: 28 of the 60 ids it samples stop a row) to > 0.8
    (0.875 with the layers scanned; 1.0 when XLA unrolls them: the same math rounded in
    another order draws other samples along the way; lr 1e-2 got to 0.53 in 12)."""
    from emor3_jax.sampling.sampler import Sampler

    real = lambda cfg: Sampler(cfg, prompt_buckets=(8,), gen_buckets=(G,), pad_id=PAD)
    tx, _ = make_optimizer(OptimizerSettings.constant(3e-2))
    mesh, learner, params, step, records = _setup(
        B * N,
        "token",
        tx,
        sampler=real,
        stop_ids=tuple(range(32, 64)),
        task=OneTokenTask(),
        recompute_old_logprobs=False,
    )
    held_out = [{"id": f"h{i}", "label": "x", "ids": [5 + i % 7, 3 + i % 5, 1 + i % 3]} for i in range(16)]

    def share(params) -> float:  # one-token responses to the held-out prompts, N = 2 samples each
        exp = step.experience(params, params, held_out, jax.random.key(10**6))
        return float(exp.rewards["overall"].mean())

    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        before = share(params)
        opt = learner.init(params)
        for i in range(12):
            exp = step.experience(params, params, records, jax.random.key(i))
            params, opt, _ = step.update(params, opt, exp, step=i + 1)
        after = share(params)
    step.close()
    assert before < 0.5 and after > 0.8, (before, after)


def _host_weights(state) -> dict:
    """{path: host array} of an nnx.State."""
    return {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


class RecordingSampler(ScriptedSampler):
    """The scripted sampler, keeping each call's weights: live (to see them deleted) and on the host."""

    def __init__(self):
        self.live, self.host = [], []

    def generate(self, model, prompts, *, key, max_new_tokens, n=1, params=None):
        state = nnx.state(model)
        self.live.append(jax.tree.leaves(state))
        self.host.append(_host_weights(state))
        return super().generate(model, prompts, key=key, max_new_tokens=max_new_tokens, n=n, params=params)


@dataclasses.dataclass(frozen=True)
class PolicyJudgedTask(ScriptedTask):
    """The scripted task with reflections the policy answers (one generate call, answers unused)."""

    reflects: bool = True

    def reflect(self, sampler, judge, encoder, ro, *, key):
        sampler.generate(judge, ro.prompts, key=key, max_new_tokens=G, n=ro.n, params=GREEDY)
        ro.text_answers = ro.image_answers = [None] * len(ro.responses)


def test_each_step_samples_with_a_fresh_copy_deleted_before_it_returns():
    """Two GRPO steps with a bf16 replicated copy: the rollouts and the policy's reflections of
    each step see the copy of that step's params (after the first update, the new ones: a copy
    kept from step 1 fails), and every buffer of it is deleted before `experience` returns, so
    the update runs without it; the master params stay fp32 and whole."""
    recorder = RecordingSampler()
    mesh, learner, params, step, records = _setup(B * N, "token", devices=8, task=PolicyJudgedTask())
    step.sampler = recorder
    step.rollout_weights = rollout_weights.copier(params, mesh, sharding.DEFAULT_RULES, "bfloat16", "replicated")
    bf16 = lambda p: _host_weights(jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))
    opt, seen = learner.init(params), []
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        for i in range(2):
            exp = step.experience(params, params, records, jax.random.key(i))
            assert "rollout_weights_s" in exp.times and len(recorder.live) == 2 * (i + 1)  # rollout + reflection
            for live in recorder.live:  # this step's copy and the last one's: gone before any update
                assert all(x.is_deleted() for x in live)
            assert not any(x.is_deleted() for x in jax.tree.leaves(params))
            want = bf16(params)
            for host in recorder.host[-2:]:
                assert host.keys() == want.keys()
                for k in want:
                    assert host[k].dtype == jnp.bfloat16
                    np.testing.assert_array_equal(host[k], want[k], err_msg=k)
            seen.append(want)
            params, opt, _ = step.update(params, opt, exp, step=i + 1)
    step.close()
    moved = [k for k in seen[0] if not np.array_equal(seen[0][k], seen[1][k])]
    assert moved, "the update moved no weight the bf16 copy can see"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
