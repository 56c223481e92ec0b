"""One GRPO step as two calls: `GRPOStep.experience` turns a global batch of records into an
`Experience` (rollouts, reflections, rewards by name, advantages, reference and old log-probs,
the training rows); `GRPOStep.update` learns from it (mini-batches, micro-batches, gradient
accumulation weighted for the loss mode) and returns the new parameters, optimizer state and
metrics. The trainer, the evaluation and the benches call these; none rebuilds a piece.

Letters: B prompts, n samples per prompt, R = B * n rows, P prompt bucket, G response bucket.

Rows b*n .. b*n+n-1 answer record b. The task (emo_r3/task.py) says what is asked and how a
response is scored; the step logs whatever named components its `score` returns.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax.rl.advantages import ESTIMATORS, compute_advantages
from emor3_jax.rl.learner import GRPOSettings, Learner, check_finite
from emor3_jax.rl.rollout import Rollouts, sample_rollouts, score_async, training_rows
from emor3_jax.runtime import multihost
from emor3_jax.sampling.methods import SamplingParams


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSettings:
    """What one GRPO step does, besides the loss (`loss`) and the task."""

    num_generations: int  # n responses per prompt
    advantage: str  # a key of rl.advantages.ESTIMATORS
    max_response_len: int
    rollout: SamplingParams
    micro_batch: int  # rows per forward / backward
    update_batch: int  # prompts per optimizer step
    recompute_old_logprobs: bool  # False: the sampler's log-probs are the old policy's
    prompt_buckets: tuple[int, ...]
    loss: GRPOSettings

    def __post_init__(self):
        if self.advantage not in ESTIMATORS:
            raise ValueError(f"advantage must be one of {tuple(ESTIMATORS)}, got {self.advantage!r}")
        rows = self.update_batch * self.num_generations
        if self.micro_batch < 1 or rows % self.micro_batch:
            raise ValueError(f"micro_batch {self.micro_batch} must divide update_batch * num_generations = {rows}")

    @classmethod
    def from_config(cls, c) -> StepSettings:
        rl = c.rl
        return cls(
            num_generations=rl.num_generations,
            advantage=rl.advantage,
            max_response_len=rl.max_response_len,
            rollout=SamplingParams(temperature=rl.temperature, top_p=rl.top_p),
            micro_batch=rl.micro_batch,
            update_batch=rl.update_batch,
            recompute_old_logprobs=rl.recompute_old_logprobs,
            prompt_buckets=tuple(c.sampling.prompt_buckets),
            loss=GRPOSettings.from_config(c),
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
    batches: list[tuple]  # per micro-batch: (SequenceBatch, response mask [m, G])
    p_len: int
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
        stop_ids,
        logit_bias,
        threads: int = 4,
    ):
        self.learner, self.sampler, self.encoder, self.task = learner, sampler, encoder, task
        self.s, self.pad_id, self.stop_ids, self.logit_bias = settings, pad_id, stop_ids, logit_bias
        self.pool = ThreadPoolExecutor(threads)

    def close(self) -> None:
        self.pool.shutdown()

    def experience(self, params, ref, records: list[dict], key) -> Experience:
        """Rollouts of `records` (the global batch, the same on every process) under `params`,
        reflections by the task's judge (the policy, or `ref`), rewards scored on the host while
        the device computes reference (and, if configured, old) log-probs, and advantages."""
        s, times, t = self.s, {}, time.perf_counter()
        policy = self.learner.model(params)
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
            stop_ids=self.stop_ids,
            logit_bias=self.logit_bias,
        )
        times["rollout_s"], t = time.perf_counter() - t, time.perf_counter()
        if self.task.reflects:
            judge = policy if self.task.judge == "policy" else self.learner.model(ref)
            self.task.reflect(
                self.sampler,
                judge,
                self.encoder,
                ro,
                key=jax.random.fold_in(key, 1),
                stop_ids=self.stop_ids,
                logit_bias=self.logit_bias,
            )
        times["reflection_s"], t = time.perf_counter() - t, time.perf_counter()
        futures = score_async(self.pool, ro, self.task.score, multihost.local_rows(len(ro.responses)))
        # While the host scores: the rows, their reference (and old) log-probs on device.
        rows = np.arange(len(ro.responses))
        micro = [rows[i : i + s.micro_batch] for i in range(0, len(rows), s.micro_batch)]
        built = [training_rows(ro, self.encoder.cfg, self.pad_id, s.prompt_buckets, m) for m in micro]
        p_len, g_len = built[0][2], built[0][3]
        batches = [(b[0], b[1]) for b in built]
        logprobs = lambda p: [self.learner.logprobs(p, b, p_len - 1, g_len) for b, _ in batches]
        ref_lp = logprobs(ref)
        old_lp = logprobs(params) if s.recompute_old_logprobs else [ro.old_logp[m] for m in micro]
        jax.block_until_ready((ref_lp, old_lp))
        times["logprobs_s"], t = time.perf_counter() - t, time.perf_counter()
        scores = [f.result() for f in futures]  # this process's rows
        names, local = reward_table(scores)
        table = multihost.gather_rows(local)
        times["scoring_wait_s"] = time.perf_counter() - t
        adv = np.asarray(compute_advantages(jnp.asarray(table[:, 0]), s.num_generations, s.advantage))
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

    def update(self, params, opt, exp: Experience, *, step: int) -> tuple[object, object, dict]:
        """One pass over the experience in mini-batches of update_batch prompts, one optimizer
        step each; every micro-batch's gradient is weighted by its share of the mini-batch's
        loss (tokens in "token" mode, rows in "seq" mode), so the accumulated gradient equals
        the mini-batch's. Returns (params, opt, metrics averaged over micro-batches, grad_norm
        over optimizer steps). Stops at a non-finite loss or gradient norm, naming `step`."""
        s, learner = self.s, self.learner
        per_step = s.update_batch * s.num_generations // s.micro_batch  # micro-batches per optimizer step
        sums, count = {}, 0
        for first in range(0, len(exp.batches), per_step):
            group = range(first, first + per_step)
            if s.loss.loss_mode == "token":
                sizes = [float(exp.batches[i][1].sum()) for i in group]
            else:
                sizes = [float(len(exp.micro[i])) for i in group]
            total = max(sum(sizes), 1.0)
            grads = None
            for i, size in zip(group, sizes):
                batch, mask = exp.batches[i]
                g, m = learner.grpo_grads(
                    params,
                    batch,
                    exp.p_len - 1,
                    exp.g_len,
                    exp.old_logp[i],
                    exp.ref_logp[i],
                    exp.advantages[exp.micro[i]],
                    mask,
                    size / total,
                    s.loss,
                )
                grads = learner.accumulate(grads, g)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            params, opt, gnorm = learner.apply(params, opt, grads)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gnorm) * per_step
            check_finite(step, "grpo", loss=sums.get("loss", 0.0), grad_norm=gnorm)
        return params, opt, {k: v / count for k, v in sums.items()}
