"""LoRA in training (lora.rank > 0) on the tiny preset, a bf16 base under fp32 adapters: one
cold-start update and one GRPO update change the adapters alone (the base bit-identical, the
same arrays even) and keep AdamW state for them only; the reference (rl/reference.py `frozen`)
gives the rank-0 base model's log-probs exactly at fresh adapters; the rollout copy (rl/rollout_weights.py) holds
the adapted model, merged. The steps' scripted tasks and samplers: rl/test_sft.py and
rl/test_experience.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from emor3_jax.core import sharding
from emor3_jax.core.batches import SequenceBatch
from emor3_jax.models import lora
from emor3_jax.models.api import create_model, preset
from emor3_jax.rl import reference, rollout_weights
from emor3_jax.rl.experience import GRPOStep, StepSettings
from emor3_jax.rl.learner import GRPOSettings, Learner, OptimizerSettings, make_optimizer
from emor3_jax.rl.sft import SFTSettings, SFTStep
from emor3_jax.sampling.methods import SamplingParams
from tests.rl import test_experience as grpo_fixtures
from tests.rl import test_sft as sft_fixtures

RULES = sharding.DEFAULT_RULES


def _model(rank: int, devices: int = 1, param_dtype: str = "bfloat16"):
    """(cfg, mesh, graphdef, params) of the tiny preset (vocab 64), seed 0, LoRA of `rank` on
    every target."""
    cfg = preset("tiny", vocab_size=64, param_dtype=param_dtype, compute_dtype="float32")
    cfg = cfg.replace(lora_rank=rank, lora_targets=tuple(lora.TARGETS))
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:devices])
    graphdef, params = nnx.split(create_model(cfg, mesh, RULES, seed=0))
    return cfg, mesh, graphdef, params


def _learner(graphdef, rank: int = 8) -> Learner:
    tx, _ = make_optimizer(OptimizerSettings.constant(1e-2, weight_decay=0.01))  # AdamW: every adapter moves
    return Learner(graphdef, tx, trainable=lora.trainable(rank))


def _split(params) -> tuple[dict, dict]:
    """({path: array} of the adapters, {path: array} of the base)."""
    adapters, base = {}, {}
    for path, v in nnx.to_flat_state(params):
        (adapters if isinstance(v, lora.LoRAParam) else base)[path] = v.get_value()
    return adapters, base


def _snapshot(params) -> tuple[dict, dict, dict]:
    """(host copies of the adapters, the base's arrays, host copies of them): apply donates the
    adapters' buffers."""
    adapters, base = _split(params)
    host = lambda d: {p: np.asarray(x) for p, x in d.items()}
    return host(adapters), base, host(base)


def _only_adapters_moved(before, after, opt) -> None:
    a0, base0, host0 = before
    a1, b1 = _split(after)
    assert base0.keys() == b1.keys() and all(b1[p] is base0[p] for p in base0)  # the same arrays, never copied
    for p in b1:
        assert b1[p].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(b1[p]), host0[p], err_msg=str(p))
    moved = [p for p in a0 if not np.array_equal(a0[p], np.asarray(a1[p]))]
    text = [p for p in a0 if p[0] == "layers"]  # the batches have no image: the vision adapters get no gradient
    assert set(text) <= set(moved), "every language-model adapter moves (B from its zeros)"
    mu = opt[1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
    assert {p for p, _ in nnx.to_flat_state(mu)} == set(a0)  # moments for the adapters only


def test_a_cold_start_update_moves_only_the_adapters():
    cfg, mesh, graphdef, params = _model(8)
    step = SFTStep(
        learner=_learner(graphdef),
        encoder=sft_fixtures.ScriptedEncoder(cfg),
        task=sft_fixtures.ScriptedTask(),
        settings=SFTSettings(buckets=sft_fixtures.BUCKETS, judge_batch_size=2),
        pad_id=sft_fixtures.PAD,
    )
    before = _snapshot(params)
    with sharding.use_mesh(mesh, RULES):
        opt = step.learner.init(params)
        after, opt, metrics = step.update(params, opt, sft_fixtures.RECORDS, step=1)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    _only_adapters_moved(before, after, opt)


def _grpo_step(cfg, learner: Learner) -> GRPOStep:
    settings = StepSettings(
        num_generations=grpo_fixtures.N,
        advantage="grpo",
        max_response_len=grpo_fixtures.G,
        rollout=SamplingParams(temperature=1.0),
        micro_batch=4,
        update_batch=grpo_fixtures.B,
        prompt_buckets=(8,),
        loss=GRPOSettings(clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.1, kl_kind="k3", loss_mode="token"),
        recompute_old_logprobs=True,
    )
    return GRPOStep(
        learner=learner,
        sampler=grpo_fixtures.ScriptedSampler(),
        encoder=grpo_fixtures.ScriptedEncoder(cfg),
        task=grpo_fixtures.ScriptedTask(),
        settings=settings,
        pad_id=grpo_fixtures.PAD,
        threads=1,
    )


RECORDS = [{"id": str(b), "label": "x", "ids": list(range(1, 3 + b))} for b in range(grpo_fixtures.B)]


def test_a_grpo_update_moves_only_the_adapters_against_the_base_as_reference():
    """Two micro-batches accumulated (adapter-shaped gradients), the reference the base: at step
    0 the policy is the base, so its log-probs equal the reference's exactly (KL 0)."""
    cfg, mesh, graphdef, params = _model(8, devices=2)
    step = _grpo_step(cfg, _learner(graphdef))
    before = _snapshot(params)
    with sharding.use_mesh(mesh, RULES):
        ref = reference.frozen(params)
        exp = step.experience(params, ref, RECORDS, jax.random.key(0))
        for old, refp in zip(exp.old_logp, exp.ref_logp):
            np.testing.assert_array_equal(np.asarray(old), np.asarray(refp))
        opt = step.learner.init(params)
        after, opt, metrics = step.update(params, opt, exp, step=1)
        # after the update the policy differs from the base, which the reference still is
        exp2 = step.experience(after, ref, RECORDS, jax.random.key(1))
    step.close()
    assert metrics["grad_norm"] > 0
    _only_adapters_moved(before, after, opt)
    assert any(np.abs(np.asarray(o) - np.asarray(r)).max() > 1e-6 for o, r in zip(exp2.old_logp, exp2.ref_logp))


def _trained_adapters(params):
    """`params` with every adapter matrix drawn at random: a policy far from its base."""
    keys = iter(jax.random.split(jax.random.key(7), 1000))
    draw = lambda v: v.replace(jax.device_put(0.05 * jax.random.normal(next(keys), v.shape, v.dtype), v.sharding))
    return nnx.from_flat_state(
        [(p, draw(v) if isinstance(v, lora.LoRAParam) else v) for p, v in nnx.to_flat_state(params)]
    )


def _batch(cfg):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    positions = np.broadcast_to(np.cumsum(mask, axis=1) - 1, (3, *ids.shape)).astype(np.int32)
    return SequenceBatch(input_ids=ids, positions=positions, attention_mask=mask, pixels=None, layout=None)


def test_the_reference_is_the_base_at_fresh_adapters_and_the_policy_as_grpo_found_it():
    """Fresh adapters (B = 0): the reference's log-probs equal the rank-0 model's of the same seed
    and dtype bit for bit. Trained adapters (after a LoRA cold start): the reference is that
    policy, and stays it when the policy's adapters change. Its base arrays are the policy's own
    (no second copy), its adapters copies (the policy's are donated to each update)."""
    cfg, _, graphdef, params = _model(8)
    _, _, base_graphdef, base_params = _model(0)
    batch = _batch(cfg)
    logp = lambda g, p: np.asarray(Learner(g, optax.sgd(1.0)).logprobs(p, batch, 2, 7))
    want = logp(base_graphdef, base_params)
    np.testing.assert_array_equal(logp(graphdef, reference.frozen(params)), want)
    policy = _trained_adapters(params)
    ref = reference.frozen(policy)
    cold_started = logp(graphdef, policy)
    assert np.abs(cold_started - want).max() > 1e-3
    double = lambda v: v.replace(2 * v.get_value()) if isinstance(v, lora.LoRAParam) else v
    moved = nnx.from_flat_state([(p, double(v)) for p, v in nnx.to_flat_state(policy)])  # after updates
    np.testing.assert_array_equal(logp(graphdef, ref), cold_started)
    assert np.abs(logp(graphdef, moved) - cold_started).max() > 1e-3
    (ref_adapters, ref_base), (pol_adapters, pol_base) = _split(ref), _split(policy)
    assert all(r is p for r, p in zip(ref_base.values(), pol_base.values()))
    assert all(r is not p for r, p in zip(ref_adapters.values(), pol_adapters.values()))


@pytest.mark.parametrize("dtype, atol", [("float32", 2e-5), ("bfloat16", 0.15)])
def test_the_rollout_copy_is_the_adapted_model_merged(dtype, atol):
    """The copy's logits are the adapted (training) model's: an fp32 copy to fp32 rounding, a bf16
    copy to bf16's; a copy that dropped the adapters is off by more than either bound."""
    cfg, mesh, graphdef, params = _model(8, devices=8, param_dtype="float32")
    policy = _trained_adapters(params)
    batch = _batch(cfg)
    forward = nnx.jit(lambda m: m(batch.input_ids, batch.positions, batch.attention_mask))
    with sharding.use_mesh(mesh, RULES):
        copy = rollout_weights.copier(policy, mesh, RULES, dtype, "replicated")(policy)
        got = np.asarray(forward(nnx.merge(graphdef, copy)))
        want = np.asarray(forward(nnx.merge(graphdef, policy)))
        base = np.asarray(forward(nnx.merge(graphdef, lora.adapters_off(policy))))
    assert all(not np.asarray(x).any() for x in _split(copy)[0].values())  # merged: no adapter term
    np.testing.assert_allclose(got, want, atol=atol)
    assert np.abs(base - want).max() > 3 * atol


def test_lora_dropout_gradients_repeat_with_their_key_and_change_with_another():
    """The cold start's and GRPO's gradients with lora dropout 0.2 at fresh adapters (B's gradient,
    (dropout(x) A)^T dL/dy, sees the masks): bit-identical again with the same key (what a resumed
    step is given: the run's seed, step and micro-batch), another gradient with another key (no
    dropout, or masks that ignore the key, would give the same). Adapters alone get gradients."""
    cfg, _, graphdef, params = _model(8)
    learner, batch = _learner(graphdef), _batch(cfg)
    loss_mask = batch.attention_mask[:, 1:].astype(np.float32)
    old = np.full((3, 7), -4.0, np.float32)  # about log(1 / 64): ratios near 1, inside the clip
    settings = GRPOSettings(clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.1, kl_kind="k3", loss_mode="token")
    mask, advantages = batch.attention_mask[:, 3:].astype(np.float32), np.asarray([1.0, -1.0, 0.5], np.float32)
    grads = {
        "sft": lambda d: learner.sft_grads(params, batch, loss_mask, 1.0, d)[0],
        "grpo": lambda d: learner.grpo_grads(params, batch, 2, 7, old, old, advantages, mask, 1.0, settings, d)[0],
    }
    for name, grad in grads.items():
        first, again, other = (
            [np.asarray(x) for x in jax.tree.leaves(grad(lora.Dropout(jax.random.key(k), 0.2)))] for k in (1, 1, 2)
        )
        assert len(first) == len(_split(params)[0]), name
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b, err_msg=name)
        assert max(np.abs(a - b).max() for a, b in zip(first, other)) > 1e-4, name
