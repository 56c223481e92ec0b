"""The training run: config -> data -> model -> cold start -> GRPO -> evaluation -> export-ready
checkpoints. The loop reads as the algorithm: records -> experience -> update -> log, evaluate,
checkpoint; the steps themselves are rl/sft.py (cold start) and rl/experience.py (GRPO), the
run's set-up run_setup.py.

Steps are numbered globally (cold start 1..S, then GRPO S+1..S+G) for checkpoints and logs;
each checkpoint records the phase, the data iterators' states and the step, and every random
draw is keyed by (seed, global step), so a resumed run repeats exactly what the lost steps
would have done.
"""

from __future__ import annotations

import contextlib
import sys
import time

import jax
from etils import epath
from flax import nnx
from ml_collections import ConfigDict

from emor3_jax import config_lib, run_setup
from emor3_jax.core import multihost, paths
from emor3_jax.core import profile as run_profile
from emor3_jax.core.workdir_lock import WorkdirLock
from emor3_jax.data import store
from emor3_jax.emo_r3.reflection_examples import held_out_examples, judge_accuracy
from emor3_jax.evaluation import report as eval_report
from emor3_jax.evaluation.evaluate import HeldOutSettings, heldout, heldout_metrics
from emor3_jax.models import lora
from emor3_jax.rl import divergence, reference, rollout_weights
from emor3_jax.rl.experience import Experience, GRPOStep, StepSettings
from emor3_jax.rl.learner import Learner, OptimizerSettings, make_optimizer
from emor3_jax.rl.sft import SFTSettings, SFTStep

PHASES = ["cold_start", "grpo"]


class Run:
    """Everything a run holds; phases are methods. Built from a config whose hub ids are resolved
    and that is validated: by train.main before it takes the workdir lock, else by Run.checked."""

    @classmethod
    def checked(cls, c: ConfigDict, accepted: tuple[str, ...] = (), lock: WorkdirLock | None = None) -> Run:
        """The run of a config built in code (tests, benches): resolves its hub ids and validates
        it as train.main does (config_lib; every bad value in one ValueError), then builds it."""
        config_lib.resolve_hub_ids(c)
        config_lib.validate(c)
        return cls(c, accepted, lock)

    def __init__(self, c: ConfigDict, accepted: tuple[str, ...] = (), lock: WorkdirLock | None = None):
        self.c, self.accepted = c, accepted
        s = run_setup.set_up(c, lock)
        self.prof, self.scratch, self.vocab, self.rt = s.prof, s.scratch, s.vocab, s.rt
        self.encoder, self.task = s.encoder, s.task
        self.data_dir, self.bad, self.dropped, self.test_records = s.data_dir, s.bad, s.dropped, s.test_records
        self.graphdef, self.params, self.rl_steps = s.graphdef, s.params, s.rl_steps
        self.ckpts, self.writer, self.preempt, self.key = s.ckpts, s.writer, s.preempt, s.key
        self.meta = {
            "phase": PHASES[0],
            "phase_step": 0,
            "global_step": 0,
            "data": {},
            "best_accuracy": -1.0,
            "evals": {},
        }
        self.resumed = {}  # the restored checkpoint's arrays besides params, for its phase to take
        # params -> the copy the policy samples with (rl.rollout_dtype); None: the params themselves
        self.copier = None
        if c.rl.rollout_dtype:
            rules, dtype, layout = self.rt.rules, c.rl.rollout_dtype, c.rl.rollout_sharding
            self.copier = rollout_weights.copier(self.params, self.rt.mesh, rules, dtype, layout)

    # ---- helpers
    def iterator(self, phase: str, batch_size: int, split: str = "train"):
        """`phase`'s training records in global batches, resumed from the checkpoint's state."""
        state = self.meta["data"].get(phase)
        return store.train_iterator(self.data_dir, phase, batch_size, self.c.seed, state, split=split)

    def model(self, params=None):
        return nnx.merge(self.graphdef, self.params if params is None else params)

    @contextlib.contextmanager
    def sampling_model(self):
        """The policy as evaluation and the judge check sample it: with the rollout copy of the
        current params (rl.rollout_dtype), made now and deleted on leaving, else the training
        model itself."""
        if self.copier is None:
            yield self.model()
            return
        weights = self.copier(self.params)
        try:
            yield self.model(weights)
        finally:
            rollout_weights.delete(weights)

    def save(self, state: dict, best: bool = False) -> None:
        """Saves `state` as the current step; a LoRA run's params and reference as their adapters
        alone (the base is read from its path again)."""
        if self.c.lora.rank:
            state = {k: lora.adapters(v) if k in ("params", "ref") else v for k, v in state.items()}
        self.ckpts.save(self.meta, state, self.writer.sizes(), best)

    def _report_data(self) -> None:
        """Logs (at step 0) the records skipped as bad and the prompts dropped as too long."""
        self.writer.records_skipped(self.bad)
        for split, rows in self.dropped.items():
            if not rows:
                continue
            huge = [d["id"] for d in rows if d["too_large_at_min_pixels"]]
            print(f"data {split}: dropped {len(rows)} prompts over rl.max_prompt_len: {[d['id'] for d in rows]}")
            if huge:
                print(f"data {split}: images too large even at data.min_pixels: {huge}")
            self.writer.write(f"data_{split}", 0, {"prompts_dropped": len(rows), "images_too_large": len(huge)})

    def _optimizer(self, phase: str):
        total = self.c.cold_start.steps if phase == "cold_start" else self.rl_steps
        return make_optimizer(OptimizerSettings.from_config(self.c, phase, total))

    def _learner(self, tx) -> Learner:
        """The learner of `tx` over what trains: every parameter, or the LoRA adapters alone."""
        return Learner(self.graphdef, tx, trainable=lora.trainable(self.c.lora.rank))

    def _dropout(self, step: int) -> lora.Dropout | None:
        """The LoRA dropout of global step `step`'s gradient passes, None at lora.dropout = 0: keyed
        by (seed, step) like every draw of the run (the steps fold in each micro-batch), so a
        resumed step drops out what the lost one did."""
        rate = self.c.lora.dropout
        return lora.Dropout(jax.random.fold_in(self.key, 3 * 10**6 + step), rate) if rate else None

    def _reference(self):
        """The GRPO reference of the current params: a copy in rl.reference_dtype, or with LoRA
        a copy of the adapters over the base itself (reference.frozen)."""
        if self.c.lora.rank:
            return reference.frozen(self.params)
        return reference.copy(self.params, config_lib.reference_dtype(self.c))

    def _abstract_state(self, meta: dict) -> dict:
        """The tree a checkpoint of `meta`'s phase holds (arrays give shapes and shardings).
        Raises ValueError first when the config changed in ways a resume does not accept."""
        config_lib.resume_changes(meta["config"], self.c, self.accepted)
        state = {
            "params": lora.adapters(self.params) if self.c.lora.rank else self.params,
            "opt": self._learner(self._optimizer(meta["phase"])[0]).init(self.params),
        }
        if meta["phase"] == "grpo":  # a LoRA run's reference: its adapters as GRPO started
            dtype = config_lib.reference_dtype(self.c)
            state["ref"] = state["params"] if self.c.lora.rank else reference.abstract(self.params, dtype)
        return state

    def resume_meta(self) -> None:
        """Adopts the newest intact checkpoint: its metadata (phase, steps, data state) and params
        now, its other arrays for its phase (self.resumed); the logs are cut back to it. Without
        a checkpoint the run starts over: the logs of an attempt killed before it saved go."""
        got = self.ckpts.resume(self._abstract_state)
        if got is None:
            self.writer.rewind({})
            self._report_data()
            return
        self.meta, state, log_sizes, saved_config = got
        for line in config_lib.resume_changes(saved_config, self.c, self.accepted):
            print(line)
        self.writer.rewind(log_sizes)
        saved = state.pop("params")  # a LoRA run's: its adapters, onto the base set_up read again
        self.params = lora.with_adapters(self.params, saved) if self.c.lora.rank else saved
        self.resumed = state

    def _stop(self, phase: str, why: str) -> None:
        """Raises FloatingPointError: `why` (which names the step) and what a rerun does."""
        section = "cold_start" if phase == "cold_start" else "rl"
        flag = f"--config.{section}.learning_rate (now {self.c[section].learning_rate})"
        self.ckpts.wait()  # the step claimed as kept is on disk in full
        last = self.ckpts.last_step()
        if last is None:
            kept = f"no checkpoint was saved; rerun with a lower {flag}"
        else:
            kept = (
                f"the last checkpoint (step {last} in {self.ckpts.ckpt.directory}) is kept; resume it with a lower "
                f"{flag} and --accept_changes={section}.learning_rate"
            )
        raise FloatingPointError(f"{why}; stopped before saving the step ({kept})")

    def _check_step(self, phase: str, gstep: int, norm_before: float, *reasons) -> float:
        """Stops at a diverged step (the first of `reasons` that is set, or a parameter norm
        that moved more than guard.max_norm_ratio); returns the new parameter norm."""
        norm = float(divergence.param_norm(self.params))
        why = next((r for r in reasons if r), None) or divergence.norm_ratio(
            norm_before, norm, self.c.guard.max_norm_ratio
        )
        if why:
            self._stop(phase, f"{phase} step {gstep}: {why} (bounds: --config.guard.*)")
        return norm

    def eval_all(self, label: str, step: int) -> dict:
        """Greedy and sampled held-out accuracy, format and length of the current params."""
        with self.rt.ctx(), self.prof.phase("eval"), self.sampling_model() as model:
            key = jax.random.fold_in(self.key, 10**6 + step)  # greedy and sampled alike
            greedy, sampled = heldout(
                self.rt.sampler,
                model,
                self.encoder,
                self.task,
                self.test_records,
                HeldOutSettings.from_config(self.c),
                (key, key),
            )
        out = heldout_metrics(greedy, sampled)
        self.writer.write(f"eval_{label}", step, out)
        return out

    # ---------------------------------------------------------------- cold start
    def cold_start(self) -> None:
        c = self.c.cold_start
        if self.meta["phase"] != "cold_start":
            return
        tx, lr_fn = self._optimizer("cold_start")
        step_fn = SFTStep(
            learner=self._learner(tx),
            encoder=self.encoder,
            task=self.task,
            settings=SFTSettings.from_config(self.c),
            pad_id=self.rt.pad_id,
        )
        opt = self.resumed.pop("opt") if self.resumed else step_fn.learner.init(self.params)
        norm = float(divergence.param_norm(self.params))
        # data.cold_start's records when set
        it = self.iterator("cold_start", c.batch_size, split=store.cold_start_split(self.c))
        start = self.meta["phase_step"]
        for step in range(start + 1, c.steps + 1):
            t0 = time.perf_counter()
            with self.prof.phase("cold_start"):
                records = multihost.gather_records(next(it))
                try:
                    with self.rt.ctx():
                        self.params, opt, metrics = step_fn.update(
                            self.params, opt, records, step=step, dropout=self._dropout(step)
                        )
                except FloatingPointError as e:
                    self._stop("cold_start", str(e))
                norm = self._check_step("cold_start", step, norm)
            self.meta.update(phase_step=step, global_step=step)
            self.meta["data"]["cold_start"] = it.get_state()
            self._log_cold_start(step, start, metrics, lr_fn(step), t0)
            self._checkpoint(
                step % self.c.checkpoint.every == 0 or step == c.steps, {"params": self.params, "opt": opt}
            )
            self.prof.step(f"cold_start {step}", t0)
        if c.judge_records:
            self.judge_check(self.meta["global_step"])

    def _log_cold_start(self, step: int, start: int, metrics: dict, lr, t0: float) -> None:
        """metrics.jsonl / TensorBoard scalars of a cold-start step and the progress line."""
        # learning_rate after grad_norm: the column order metrics.jsonl has always had
        scalars = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "learning_rate": lr, **metrics}
        scalars.update(step_s=time.perf_counter() - t0, compile_s=self.prof.take_compile_s())
        self.writer.write("cold_start", step, scalars)
        self.writer.progress("cold_start", step, self.c.cold_start.steps, start, f"loss {metrics['loss']:.3f}")

    def judge_check(self, step: int) -> dict:
        """The policy as judge: its greedy accuracy on the reflection questions of
        cold_start.judge_records held-out synthetic records (reflection_examples), logged as
        phase "judge" and printed."""
        c = self.c
        examples = held_out_examples(
            c.cold_start.judge_records, c.seed, c.data.image_size, c.data.labels, c.data.synthetic_detail
        )
        with self.rt.ctx(), self.prof.phase("judge"), self.sampling_model() as model:
            answers = self.task.judge_answers(
                self.rt.sampler,
                model,
                self.encoder,
                examples,
                key=jax.random.fold_in(self.key, 2 * 10**6 + step),
            )
        acc = judge_accuracy(examples, answers)
        out = {"judge_accuracy": acc["overall"], "judge_text": acc["text"], "judge_image": acc["image"]}
        out.update({f"judge_kind_{kind}": v for kind, v in acc["per_kind"].items()})  # kind "text" is not "judge_text"
        self.writer.write("judge", step, out)
        kinds = ", ".join(f"{kind} {v:.2f}" for kind, v in acc["per_kind"].items())
        print(
            f"\njudge after the cold start: {acc['overall']:.3f} of {acc['count']} held-out reflection questions "
            f"(text {acc['text']:.3f}, image {acc['image']:.3f}; {kinds})"
        )
        return out

    # ---------------------------------------------------------------- GRPO
    def grpo(self) -> dict:
        tx, lr_fn = self._optimizer("grpo")
        learner = self._learner(tx)
        opt, ref = self._enter_grpo(learner)
        step_fn = GRPOStep(
            learner=learner,
            sampler=self.rt.sampler,
            encoder=self.encoder,
            task=self.task,
            settings=StepSettings.from_config(self.c),
            pad_id=self.rt.pad_id,
            threads=self.c.reward.threads,
            rollout_weights=self.copier,
        )
        it = self.iterator("grpo", self.c.rl.rollout_batch)
        offset, start = self.meta["global_step"] - self.meta["phase_step"], self.meta["phase_step"]
        norm = float(divergence.param_norm(self.params))
        try:
            for step in range(start + 1, self.rl_steps + 1):
                gstep, programs = offset + step, self.rt.sampler.compiled_programs()
                t0 = time.perf_counter()
                with self.prof.phase("grpo_data"):
                    records = multihost.gather_records(next(it))
                with self.rt.ctx():
                    t = time.perf_counter()
                    exp = step_fn.experience(self.params, ref, records, jax.random.fold_in(self.key, gstep))
                    self.prof.windows(t, exp.times)  # rollout, reflection, logprobs, scoring_wait
                    t = time.perf_counter()
                    try:
                        with self.prof.phase("update"):
                            self.params, opt, metrics = step_fn.update(
                                self.params, opt, exp, step=gstep, dropout=self._dropout(gstep)
                            )
                    except FloatingPointError as e:
                        self._stop("grpo", str(e))
                    exp.times["update_s"] = time.perf_counter() - t
                norm = self._check_step("grpo", gstep, norm, *self._output_problems(exp))
                self.meta.update(phase_step=step, global_step=gstep)
                self.meta["data"]["grpo"] = it.get_state()
                self._log_grpo(step, start, exp, metrics, float(lr_fn(step)), programs)
                state = {"params": self.params, "opt": opt, "ref": ref}
                if step % self.c.eval.every == 0 or step == self.rl_steps:
                    self._validate(state, gstep)
                self._checkpoint(step % self.c.checkpoint.every == 0 or step == self.rl_steps, state)
                self.prof.step(f"grpo {gstep}", t0)
        finally:
            step_fn.close()
        return self.meta["evals"]

    def _output_problems(self, exp: Experience) -> list:
        """What the parameters produced that no healthy model does (None where fine)."""
        masks, low = [m for _, m in exp.batches], self.c.guard.min_logprob
        ro = exp.rollouts
        return [
            divergence.token_ids(ro.tokens, ro.lengths, self.vocab),
            divergence.logprobs("old", exp.old_logp, masks, low),
            divergence.logprobs("reference", exp.ref_logp, masks, low),
        ]

    def _enter_grpo(self, learner: Learner) -> tuple:
        """(optimizer state, reference params): fresh when GRPO starts (the reference is the
        cold-start result, evaluated first), else the checkpoint's (a LoRA run's reference
        adapters put back onto the base)."""
        if self.meta["phase"] == "cold_start":
            self.meta.update(phase="grpo", phase_step=0)
            if self.c.cold_start.steps:
                self.meta["evals"]["cold_start"] = self.eval_all("cold_start", self.meta["global_step"])
            return learner.init(self.params), self._reference()
        opt, ref = self.resumed.pop("opt"), self.resumed.pop("ref")
        return opt, lora.with_adapters(self.params, ref) if self.c.lora.rank else ref

    def _log_grpo(self, step: int, start: int, exp: Experience, metrics: dict, lr: float, programs: int) -> None:
        """metrics.jsonl / TensorBoard scalars of a GRPO step (every reward component the task
        returned), sample responses, the progress line, and the first reward errors."""
        gstep, ro = self.meta["global_step"], exp.rollouts
        for s in [s for s in exp.scores if "error" in s][:3]:
            print(f"\nreward error at step {gstep}: {s['error']}", file=sys.stderr)
        comp = {k: float(v.mean()) for k, v in exp.rewards.items()}
        log = {**{f"reward_{k}": v for k, v in comp.items()}, **metrics, **exp.times}
        log.update(
            response_length=float(ro.lengths.mean()),
            reward_errors=exp.errors,
            learning_rate=lr,
            tokens_per_s=float(ro.lengths.sum()) / sum(exp.times.values()),
            new_programs=self.rt.sampler.compiled_programs() - programs,
            compile_s=self.prof.take_compile_s(),
        )
        self.writer.write("grpo", gstep, log)
        if step % self.c.log.samples_every == 0 or step == 1:
            for i, text in enumerate(exp.sample_texts(self.c.log.num_samples)):
                self.writer.text("grpo", gstep, f"sample_{i}", text)
        info = f"reward {comp['overall']:.3f} acc {comp.get('accuracy', 0.0):.2f} kl {log['kl']:.4f}"
        self.writer.progress("grpo", step, self.rl_steps, start, info)

    def _validate(self, state: dict, gstep: int) -> None:
        """Held-out accuracy now; a new best of eval.best_by (config_lib.BEST_BY) saves to best/."""
        ev = self.eval_all("grpo", gstep)
        r = self.c.reward
        # Without reflection coherence = consistency = 1, and the mean reward is linear in the
        # accuracy and format rates.
        ev["sampled_reward"] = (
            r.w_accuracy * ev["sampled_accuracy"] + r.w_coherence + r.w_consistency + r.w_format * ev["sampled_format"]
        )
        # meta keeps the name "best_accuracy" (saved checkpoints have it); it holds eval.best_by's best.
        if ev[self.c.eval.best_by] > self.meta["best_accuracy"]:
            self.meta["best_accuracy"] = ev[self.c.eval.best_by]
            self.save(state, best=True)
        self.meta["evals"]["grpo"] = ev

    def _checkpoint(self, due: bool, state: dict) -> None:
        """Saves when due or when any process got SIGTERM; after a SIGTERM every process exits."""
        stop = multihost.any_process(self.preempt.requested)  # every process saves, then stops
        if due or stop:
            with self.prof.phase("checkpoint"):
                self.save(state)
        if stop:
            self.ckpts.wait()
            print(f"\nSIGTERM: saved step {self.meta['global_step']} to {self.ckpts.ckpt.directory}; exiting")
            raise SystemExit(0)

    def report_profile(self) -> dict:
        """The profile table printed and written to the workdir (profile.txt); its numbers."""
        summary = self.prof.summary({split: len(rows) for split, rows in self.dropped.items()})
        text = run_profile.table(summary)
        if multihost.is_main():
            print("\n" + text)
            epath.Path(self.c.workdir, "profile.txt").write_text(text + "\n")
        return summary

    def close(self) -> None:
        self.prof.close()
        self.ckpts.close()
        self.writer.close()
        self.preempt.restore_handler()
        self.scratch.close()


def run(c: ConfigDict, accepted: tuple[str, ...] = (), lock: WorkdirLock | None = None) -> dict:
    """Trains as `c` says (resuming from the workdir's newest intact checkpoint; `accepted`:
    config fields that may differ from the checkpoint's, see config_lib.resume_changes; `lock`:
    the workdir lock held, checked before each save): Run.checked, then run_phases."""
    return run_phases(Run.checked(c, accepted, lock))


def run_phases(r: Run) -> dict:
    """Runs the phases of `r` (resume, cold start, GRPO), writes results.json, closes `r`."""
    c = r.c
    try:
        with r.prof.phase("resume"):
            r.resume_meta()
        if c.cold_start.steps:
            r.cold_start()
        if r.rl_steps:
            evals = r.grpo()
        else:
            evals = {"cold_start": r.eval_all("cold_start", r.meta["global_step"])}
        with r.prof.phase("checkpoint"):
            r.ckpts.wait()
        results = {
            "cold_start": evals.get("cold_start"),
            "grpo": evals.get("grpo"),
            "workdir": paths.absolute(c.workdir),
        }
        results["profile"] = r.report_profile()
        if multihost.is_main():
            eval_report.write_run_results(c.workdir, results)
        return results
    finally:
        r.close()
