"""One GRPO step as two calls: `GRPOStep.experience` turns a global batch of records into an
`Experience` (rollouts, reflections, rewards by name, advantages, reference and old log-probs,
the training rows); `GRPOStep.update` learns from it (mini-batches, micro-batches, gradient
accumulation weighted as `micro_batch_weighting` says, non-finite gradients skipped) and
returns the new parameters, optimizer state and metrics. The trainer, the evaluation and the
benches call these; none rebuilds a piece.

Letters: B prompts, n samples per prompt, R = B * n rows, P prompt bucket, G response bucket.

With `packing`, each micro-batch's rows are packed into sequences of `pack_length` tokens
(rows.packed_rows) for the reference / old log-probs and the gradients; the log-probs come
back in the same [m, G] layout, so the loss and its weighting are those of padded rows.

Micro-batches are consecutive rows, except under "per_device_mean": there the step's rows are
first spread over `loss_devices` official devices by sequence length as the official run does
(rl/balance.py) and cut into each device's micro-batches (the loss groups); a micro-batch holds
whole groups, each taking its own mean in the loss. The groups are blocks of the [m, G] rows,
so the loss is the same whatever the mesh, the micro-batch size or the packing.

Rows b*n .. b*n+n-1 answer record b. The task (emo_r3/task.py) says what is asked and how a
response is scored; the step logs whatever named components its `score` returns.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax.core import multihost, sharding
from emor3_jax.core.batches import PackedBatch
from emor3_jax.models import lora
from emor3_jax.rl import balance, rollout_weights
from emor3_jax.rl.advantages import ESTIMATORS, compute_advantages
from emor3_jax.rl.learner import GRPOSettings, Learner
from emor3_jax.rl.rows import packed_rows, score_async, training_rows
from emor3_jax.sampling.methods import SamplingParams
from emor3_jax.sampling.rollout import Rollouts, sample_rollouts

# The registry the config validation reads (rl.micro_batch_weighting):
# - "by_share": each micro-batch's gradient weighs its share of the mini-batch's loss (its
#   tokens in "token" mode, its rows in "seq" mode), so the sum is the mini-batch's gradient.
# - "equal": each micro-batch's own loss mean weighs 1 / (micro-batches per optimizer step),
#   as the official EasyR1 run accumulates on one GPU (spec section 5): a short response in a
#   micro-batch of short ones weighs more than in a mini-batch-wide token mean.
# - "per_device_mean": the official run on K GPUs (EasyR1 dp_actor.py:233-276, FSDP averaging
#   the K ranks' gradients): the step's rows are spread over K devices by sequence length
#   (rl/balance.py), each device's micro-batch of `group_rows` rows takes its own loss mean,
#   and each mean weighs 1 / (K x the device's micro-batches per optimizer step). K is the
#   official run's device count, not our mesh's: a micro-batch holds loss.groups such groups.
MICRO_BATCH_WEIGHTINGS = ("by_share", "equal", "per_device_mean")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSettings:
    """What one GRPO step does, besides the loss (`loss`) and the task."""

    num_generations: int  # n responses per prompt
    advantage: str  # a key of rl.advantages.ESTIMATORS
    max_response_len: int
    rollout: SamplingParams
    micro_batch: int  # rows per forward / backward (per_device_mean: loss.groups official micro-batches)
    update_batch: int  # prompts per optimizer step
    recompute_old_logprobs: bool  # False: the sampler's log-probs are the old policy's
    prompt_buckets: tuple[int, ...]
    loss: GRPOSettings
    # How a mini-batch's micro-batch gradients are summed (MICRO_BATCH_WEIGHTINGS).
    micro_batch_weighting: str = "by_share"
    # Optimizer steps with a non-finite gradient norm skipped in a row before the run stops
    # (0: the first one stops it).
    max_skipped_steps: int = 0
    # Rows packed into sequences of pack_length tokens (rows.packed_rows) instead of padded
    # to prompt + response buckets.
    packing: bool = False
    pack_length: int = 0
    # per_device_mean: the official devices K the step's rows are spread over (rl/balance.py).
    loss_devices: int = 1

    def __post_init__(self):
        if self.advantage not in ESTIMATORS:
            raise ValueError(f"advantage must be one of {tuple(ESTIMATORS)}, got {self.advantage!r}")
        if self.micro_batch_weighting not in MICRO_BATCH_WEIGHTINGS:
            raise ValueError(
                f"micro_batch_weighting must be one of {MICRO_BATCH_WEIGHTINGS}, got {self.micro_batch_weighting!r}"
            )
        if self.max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if self.packing and self.pack_length < 1:
            raise ValueError(f"packing needs pack_length >= 1, got {self.pack_length}")
        rows = self.update_batch * self.num_generations
        if self.micro_batch < 1 or rows % self.micro_batch:
            raise ValueError(f"micro_batch {self.micro_batch} must divide update_batch * num_generations = {rows}")
        groups, k = self.loss.groups, self.loss_devices
        if self.micro_batch_weighting != "per_device_mean" and (groups, k) != (1, 1):
            raise ValueError(f"loss.groups={groups}, loss_devices={k} need micro_batch_weighting='per_device_mean'")
        if groups < 1 or self.micro_batch % groups:
            raise ValueError(f"micro_batch {self.micro_batch} must be a multiple of loss.groups={groups}")
        if k < 1 or rows % (k * self.group_rows):
            raise ValueError(
                f"--config.rl.loss_devices={k} x --config.rl.micro_batch_per_device={self.group_rows} must "
                f"divide update_batch * num_generations = {rows}"
            )

    @property
    def group_rows(self) -> int:
        """Rows of one loss group (per_device_mean: an official device's micro-batch)."""
        return self.micro_batch // self.loss.groups

    @classmethod
    def from_config(cls, c) -> StepSettings:
        rl = c.rl
        loss, k = GRPOSettings.from_config(c), 1
        if rl.micro_batch_weighting == "per_device_mean":
            loss, k = dataclasses.replace(loss, groups=rl.micro_batch // rl.micro_batch_per_device), rl.loss_devices
        return cls(
            num_generations=rl.num_generations,
            advantage=rl.advantage,
            max_response_len=rl.max_response_len,
            rollout=SamplingParams(temperature=rl.temperature, top_p=rl.top_p),
            micro_batch=rl.micro_batch,
            update_batch=rl.update_batch,
            recompute_old_logprobs=rl.recompute_old_logprobs,
            prompt_buckets=tuple(c.sampling.prompt_buckets),
            loss=loss,
            micro_batch_weighting=rl.micro_batch_weighting,
            max_skipped_steps=rl.max_skipped_steps,
            packing=rl.packing,
            pack_length=rl.pack_length,
            loss_devices=k,
        )


@dataclasses.dataclass
class Experience:
    """Everything `update` needs, and what the trainer logs."""

    rollouts: Rollouts
    rewards: dict[str, np.ndarray]  # component -> [R] over all processes' rows, "overall" first
    scores: list[dict]  # this process's rows: the task's score dicts ("error" where scoring failed)
    errors: int  # rows whose scoring failed, all processes
    advantages: np.ndarray  # [R]
    micro: list[np.ndarray]  # row indices of each micro-batch
    batches: list[tuple]  # per micro-batch: (SequenceBatch or PackedBatch, response mask [m, G])
    p_len: int  # padded rows: the prompt bucket (packed: 0)
    g_len: int
    old_logp: list[jax.Array]  # per micro-batch [m, G]
    ref_logp: list[jax.Array]
    times: dict[str, float]  # seconds per phase

    def sample_texts(self, count: int) -> list[str]:
        """The first `count` rows as text for the logs: label, reward, response, judge answers."""
        ro = self.rollouts
        return [
            f"label: {ro.labels[i]}\nreward: {self.scores[i]}\n"
            f"response: {ro.responses[i]}\ntext judge: {ro.text_answers and ro.text_answers[i]}"
            f"\nimage judge: {ro.image_answers and ro.image_answers[i]}"
            for i in range(min(count, len(ro.responses)))
        ]


def reward_table(scores: list[dict]) -> tuple[list[str], np.ndarray]:
    """Component names ("overall" first, then in order of appearance) and [rows, names + 1]
    values, the last column 1 where scoring failed (a missing component counts 0)."""
    names = ["overall"]
    for s in scores:
        if "overall" not in s:
            raise ValueError(f"a task's score must include 'overall', got {sorted(s)}")
        names += [k for k in s if k not in names and k != "error"]
    table = np.array([[float(s.get(k, 0.0)) for k in names] + ["error" in s] for s in scores], np.float32)
    return names, table.reshape(len(scores), len(names) + 1)


class GRPOStep:
    """The GRPO step of one model graph, sampler, task and settings (see the module docstring)."""

    def __init__(
        self,
        *,
        learner: Learner,
        sampler,
        encoder,
        task,
        settings: StepSettings,
        pad_id: int,
        threads: int = 4,
        rollout_weights: Callable | None = None,
    ):
        """rollout_weights: params -> the copy the policy samples with (rl/rollout_weights.py's
        `copier`), made at each `experience` and deleted there after the reflections; None:
        the policy samples with `params` themselves."""
        self.learner, self.sampler, self.encoder, self.task = learner, sampler, encoder, task
        self.s, self.pad_id, self.rollout_weights = settings, pad_id, rollout_weights
        self.pool = ThreadPoolExecutor(threads)
        self.skipped_in_row = 0  # optimizer steps skipped in a row (non-finite gradient), across updates

    def close(self) -> None:
        self.pool.shutdown()

    def experience(self, params, ref, records: list[dict], key) -> Experience:
        """Rollouts of `records` (the global batch, the same on every process) under `params`,
        reflections by the task's judge (the policy, or `ref`), rewards scored on the host while
        the device computes reference (and, if configured, old) log-probs, and advantages.
        With `rollout_weights` the policy samples and judges with a copy of `params`, deleted
        before the log-probs (those stay on `params`): the update never holds it."""
        s, times = self.s, {}
        if self.rollout_weights is None:
            ro = self._sample(params, ref, records, key, times)
        else:
            t = time.perf_counter()
            weights = jax.block_until_ready(self.rollout_weights(params))
            times["rollout_weights_s"] = time.perf_counter() - t
            ro = self._sample(weights, ref, records, key, times)
            rollout_weights.delete(weights)  # freed here, before the log-probs and the update
            del weights
        t = time.perf_counter()
        futures = score_async(self.pool, ro, self.task.score, multihost.local_rows(len(ro.responses)))
        # While the host scores: the rows, their reference (and old) log-probs on device.
        micro = self._micro_batches(ro)
        cfg, g_len = self.encoder.cfg, ro.tokens.shape[1]
        if s.packing:
            shards = sharding.axis_shards("batch")
            batches = [packed_rows(ro, cfg, self.pad_id, s.pack_length, shards, m) for m in micro]
            p_len = 0
        else:
            built = [training_rows(ro, cfg, self.pad_id, s.prompt_buckets, m) for m in micro]
            p_len, batches = built[0][2], [(b[0], b[1]) for b in built]
        logprobs = lambda p: [self._logprobs(p, b, p_len, g_len) for b, _ in batches]
        ref_lp = logprobs(ref)
        old_lp = logprobs(params) if s.recompute_old_logprobs else [ro.old_logp[m] for m in micro]
        jax.block_until_ready((ref_lp, old_lp))
        times["logprobs_s"], t = time.perf_counter() - t, time.perf_counter()
        scores = [f.result() for f in futures]  # this process's rows
        names, local = reward_table(scores)
        table = multihost.gather_rows(local)
        times["scoring_wait_s"] = time.perf_counter() - t
        adv = multihost.to_host(compute_advantages(jnp.asarray(table[:, 0]), s.num_generations, s.advantage))
        return Experience(
            rollouts=ro,
            rewards={k: table[:, j] for j, k in enumerate(names)},
            scores=scores,
            errors=int(table[:, -1].sum()),
            advantages=adv,
            micro=micro,
            batches=batches,
            p_len=p_len,
            g_len=g_len,
            old_logp=old_lp,
            ref_logp=ref_lp,
            times=times,
        )

    def _micro_batches(self, ro: Rollouts) -> list[np.ndarray]:
        """Row indices of each micro-batch: consecutive rows, or under per_device_mean the
        official order (balance.device_micro_batches) over the rows' sequence lengths, prompt
        (image tokens expanded) plus response through its EOS, as the official attention mask."""
        s, rows = self.s, np.arange(len(ro.responses))
        if s.micro_batch_weighting != "per_device_mean":
            return [rows[i : i + s.micro_batch] for i in range(0, len(rows), s.micro_batch)]
        lengths = [len(ro.prompts[r // ro.n].ids) + int(ro.lengths[r]) for r in rows]
        rows_per_step = s.update_batch * s.num_generations
        return balance.device_micro_batches(lengths, s.loss_devices, rows_per_step, s.group_rows, s.micro_batch)

    def _sample(self, weights, ref, records: list[dict], key, times: dict) -> Rollouts:
        """The rollouts of `records` by the policy with `weights`, and the reflections of the
        task's judge (that policy, or `ref`); their seconds go to `times`."""
        s, t = self.s, time.perf_counter()
        policy = self.learner.model(weights)
        ro = sample_rollouts(
            self.sampler,
            policy,
            self.encoder,
            self.task,
            records,
            n=s.num_generations,
            key=key,
            max_new=s.max_response_len,
            params=s.rollout,
        )
        times["rollout_s"], t = time.perf_counter() - t, time.perf_counter()
        if self.task.reflects:
            judge = policy if self.task.judge == "policy" else self.learner.model(ref)
            self.task.reflect(self.sampler, judge, self.encoder, ro, key=jax.random.fold_in(key, 1))
        times["reflection_s"] = time.perf_counter() - t
        return ro

    def update(
        self, params, opt, exp: Experience, *, step: int, dropout: lora.Dropout | None = None
    ) -> tuple[object, object, dict]:
        """One pass over the experience in mini-batches of update_batch prompts, one optimizer
        step each, its gradient accumulated over micro-batches weighted as
        `micro_batch_weighting` says. A mini-batch whose loss or gradient norm is not finite is
        skipped (no optimizer step, as the official run does); more than max_skipped_steps
        skipped in a row, across updates, stop the run naming `step`. Returns (params, opt,
        metrics averaged over micro-batches, grad_norm over optimizer steps, skipped_steps:
        the mini-batches skipped in this update). `dropout`: the step's LoRA dropout (None: none),
        folded with each micro-batch's index in `exp.batches`."""
        s, learner = self.s, self.learner
        per_step = s.update_batch * s.num_generations // s.micro_batch  # micro-batches per optimizer step
        sums, count, norms, losses = {}, 0, [], []
        for first in range(0, len(exp.batches), per_step):
            group = range(first, first + per_step)
            if s.micro_batch_weighting in ("equal", "per_device_mean"):  # the groups' mean is in the loss
                sizes = [1.0] * per_step
            elif s.loss.loss_mode == "token":
                sizes = [float(exp.batches[i][1].sum()) for i in group]
            else:
                sizes = [float(len(exp.micro[i])) for i in group]
            total = max(sum(sizes), 1.0)
            grads, loss = None, 0.0
            for i, size in zip(group, sizes):
                batch, mask = exp.batches[i]
                args = (exp.old_logp[i], exp.ref_logp[i], exp.advantages[exp.micro[i]], mask, size / total, s.loss)
                args += (lora.fold(dropout, i),)
                if isinstance(batch, PackedBatch):
                    g, m = learner.packed_grpo_grads(params, batch, *args)
                else:
                    g, m = learner.grpo_grads(params, batch, exp.p_len - 1, exp.g_len, *args)
                grads = learner.accumulate(grads, g)
                for k, v in m.items():  # device values: nothing waits for the host until the end
                    sums[k] = sums.get(k, 0.0) + v
                loss = loss + m["loss"]
                count += 1
            params, opt, gnorm = learner.apply(params, opt, grads, loss)  # skipped on the device if not finite
            norms.append(gnorm)
            losses.append(loss)
        metrics = {k: float(v) / count for k, v in sums.items()}
        norms, losses = (np.array([multihost.to_host(x) for x in xs]) for xs in (norms, losses))
        metrics["grad_norm"] = float(norms.mean())
        skipped = 0
        for gnorm, loss in zip(norms, losses):
            if np.isfinite(gnorm) and np.isfinite(loss):
                self.skipped_in_row = 0
                continue
            skipped += 1
            self.skipped_in_row += 1
            if self.skipped_in_row > s.max_skipped_steps:
                raise FloatingPointError(
                    f"grpo step {step}: non-finite loss {loss} or gradient norm {gnorm}, "
                    f"{self.skipped_in_row} optimizer steps in a row (rl.max_skipped_steps={s.max_skipped_steps})"
                )  # the caller says what is kept: there may be no checkpoint yet
        return params, opt, {**metrics, "skipped_steps": float(skipped)}

    def _logprobs(self, params, batch, p_len: int, g_len: int) -> jax.Array:
        """Log-probs [m, G] of one micro-batch's response tokens, padded or packed."""
        if isinstance(batch, PackedBatch):
            return self.learner.packed_logprobs(params, batch)
        return self.learner.logprobs(params, batch, p_len - 1, g_len)
