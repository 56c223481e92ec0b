"""The training run: config -> data -> model -> cold start -> GRPO -> evaluation -> export-ready
checkpoints.

Steps are numbered globally (cold start 1..S, then GRPO S+1..S+G) for checkpoints and logs;
each checkpoint records the phase, the data iterators' states and the step, and every random
draw is keyed by (seed, global step), so a resumed run repeats exactly what the lost steps
would have done.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from emor3_jax import config_lib
from emor3_jax.data import pipeline, sources, tfds_builder
from emor3_jax.data.encode import Encoder, sft_batch
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.data.splits import read_split
from emor3_jax.data.tokenizers import special_token_ids, stop_ids_and_bias
from emor3_jax.evaluation.evaluate import evaluate
from emor3_jax.models.qwen25_vl.convert import load_hf
from emor3_jax.models.qwen25_vl.model import create_model
from emor3_jax.rl.advantages import compute_advantages
from emor3_jax.rl.learner import GRPOSettings, Learner, check_finite, make_optimizer
from emor3_jax.rl.rollout import Reflection, as_batch, reflect, sample_rollouts, score_async, training_rows
from emor3_jax.runtime import multihost, sharding
from emor3_jax.runtime.checkpoint import Checkpointer, PreemptionFlag
from emor3_jax.runtime.metrics import CompileTimer, MetricWriter
from emor3_jax.sampling.methods import GREEDY, SamplingParams
from emor3_jax.sampling.sampler import Sampler

PHASES = ["cold_start", "grpo"]
REWARD_KEYS = ("overall", "accuracy", "format", "coherence", "consistency")  # overall first
DATA_NAME = "emotions"


# ---------------------------------------------------------------- set-up
def load_tokenizer(c: ConfigDict):
    from transformers import AutoTokenizer

    if c.tokenizer_path or c.hf_path:
        return AutoTokenizer.from_pretrained(c.tokenizer_path or c.hf_path)
    from emor3_jax.data.tokenizers import build_test_tokenizer

    path = os.path.join(c.workdir, "tokenizer")
    tok = build_test_tokenizer(path) if multihost.is_main() else None
    multihost.barrier("test tokenizer written")  # the workdir is shared: one process writes it
    return tok or AutoTokenizer.from_pretrained(path)


def build_data(c: ConfigDict) -> tuple[str, dict]:
    """ArrayRecord files of both splits (built once per workdir): their directory, and the
    records seen / skipped as bad per split while building."""
    labels = list(c.data.labels)
    synthetic = c.data.source == "synthetic"
    counter = {} if synthetic else {"train": {}, "test": {}}  # generated records cannot be bad
    counts = {"train": c.data.synthetic_train, "test": c.data.synthetic_test}
    splits = {}
    for s in ("train", "test"):
        records = read_split(
            c.data.source,
            c.data[s],
            c.data[f"annotations_{s}"],
            s,
            labels,
            count=counts[s],
            seed=c.seed,
            image_size=c.data.image_size,
        )
        if not synthetic:
            records = sources.checked(records, c.data.skip_bad, c.data.max_bad_fraction, counter[s])
        splits[s] = records
    out = os.path.join(c.workdir, "data")
    if multihost.is_main():  # the workdir is shared: one process writes, all read their blocks
        tfds_builder.build(splits, out, DATA_NAME)
    multihost.barrier("data built")
    return out, counter


def _special_ids(tok) -> dict[str, int]:
    """Qwen's special-token ids in `tok`; raises naming any it lacks."""
    ids = special_token_ids(tok)
    missing = [n for n, i in ids.items() if i is None or i == tok.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen special tokens {missing}")
    return ids


class Run:
    """Everything a run holds; phases are methods."""

    def __init__(self, c: ConfigDict):
        config_lib.validate(c)
        self.c = c
        os.makedirs(c.workdir, exist_ok=True)
        self.tok = load_tokenizer(c)
        self.special = _special_ids(self.tok)
        self.cfg = config_lib.model_config(c, len(self.tok), self.special)
        self.mesh = sharding.make_mesh([tuple(x) for x in c.mesh])
        self.rules = [tuple(r) for r in c.logical_axis_rules]
        self.data_dir, bad = build_data(c)
        test = pipeline.open_split(self.data_dir, DATA_NAME, "test")
        count, procs, me = min(len(test), c.eval.num_examples), jax.process_count(), jax.process_index()
        # Each process reads its block; all hold the whole list, in the order one process reads it.
        self.test_records = multihost.gather_records(
            [test[i] for i in range(me * count // procs, (me + 1) * count // procs)]
        )
        self.encoder = Encoder(
            self.tok,
            ImageProcessor(min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels),
            self.cfg,
            c.data.labels,
            c.rl.max_prompt_len,
        )
        if c.hf_path:
            model = load_hf(
                c.hf_path,
                self.mesh,
                self.rules,
                param_dtype=self.cfg.param_dtype,
                compute_dtype=self.cfg.compute_dtype,
                attention_impl=self.cfg.attention_impl,
                remat=self.cfg.remat,
            )
        else:
            model = create_model(self.cfg, self.mesh, self.rules, seed=c.seed)
        self.graphdef, self.params = nnx.split(model)
        self.sampler = Sampler(
            self.cfg,
            prompt_buckets=c.sampling.prompt_buckets,
            gen_buckets=c.sampling.gen_buckets,
            pad_id=self.special["<|endoftext|>"],
            rules=self.rules,
            max_rows=c.sampling.max_rows,
        )
        self.stop_ids, self.bias = stop_ids_and_bias(self.special)
        self.ckpt = Checkpointer(os.path.join(c.workdir, "ckpt"), c.checkpoint.keep, c.checkpoint.async_save)
        self.best = Checkpointer(os.path.join(c.workdir, "best"), 1, c.checkpoint.async_save)
        self.writer = MetricWriter(c.workdir)
        self.compile = CompileTimer()
        for split, count in bad.items():
            if count:
                print(f"data {split}: skipped {count.get('bad', 0)} bad of {count.get('seen', 0)} records")
                self.writer.write(
                    f"data_{split}", 0, {"records_seen": count.get("seen", 0), "records_bad": count.get("bad", 0)}
                )
        self.preempt = PreemptionFlag()
        self.key = jax.random.key(c.seed)
        self.train_size = len(pipeline.open_split(self.data_dir, DATA_NAME, "train"))
        # rl.steps = rl.epochs = 0: the cold start alone.
        self.rl_steps = c.rl.steps or (
            max(1, c.rl.epochs * self.train_size // c.rl.rollout_batch) if c.rl.epochs else 0
        )
        self.meta = {
            "phase": PHASES[0],
            "phase_step": 0,
            "global_step": 0,
            "data": {},
            "best_accuracy": -1.0,
            "evals": {},
        }

    # ---- helpers
    def model(self, params=None):
        return nnx.merge(self.graphdef, self.params if params is None else params)

    def ctx(self):
        return sharding.use_mesh(self.mesh, self.rules)

    def iterator(self, phase: str, batch_size: int):
        """This process's block of each global batch of `batch_size` records (`next_batch` gathers
        the blocks). The state saved is the batch index, the same on every process."""
        if batch_size % jax.process_count():
            raise ValueError(
                f"{phase}: a global batch of {batch_size} does not split over {jax.process_count()} processes"
            )
        it = pipeline.make_iterator(
            self.data_dir,
            DATA_NAME,
            "train",
            batch_size=batch_size // jax.process_count(),
            seed=self.c.seed,
            shuffle=True,
            num_epochs=None,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
        if phase in self.meta["data"]:
            it.set_state(self.meta["data"][phase])
        return it

    def save(self, state: dict, best: bool = False) -> None:
        meta = dict(self.meta, model=self.cfg.to_hf_dict(), config=self.c.to_json(), metrics_lines=self.writer.lines)
        target = self.best if best else self.ckpt
        latest = target.latest_step()
        if best and latest is not None and latest >= self.meta["global_step"]:
            return  # a replayed step after resume: the same state was saved before the interruption
        target.save(self.meta["global_step"], state, meta)

    def resume_meta(self) -> None:
        """Adopts the latest checkpoint's metadata (phase, steps, data state), if any."""
        step = self.ckpt.latest_step()
        if step is None:
            return
        meta = self.ckpt.read_meta(step)
        self.meta = {k: v for k, v in meta.items() if k not in ("model", "config", "metrics_lines")}
        print(f"resuming from {self.ckpt.directory}/{step}: phase {meta['phase']} step {meta['phase_step']}")
        self.writer.truncate_to(meta["metrics_lines"])

    def restore(self, abstract_state: dict) -> dict:
        """Arrays of the latest checkpoint, checked to be of this model."""
        return self.ckpt.restore(self.ckpt.latest_step(), abstract_state, self.cfg.to_hf_dict())[0]

    def eval_all(self, label: str, step: int) -> dict:
        """Greedy and sampled (T=0.6, top_p=0.95) held-out accuracy of the current params."""
        out = {}
        model = self.model()
        with self.ctx():
            for name, params in (
                ("greedy", GREEDY),
                (
                    "sampled",
                    SamplingParams(temperature=self.c.eval.sampled_temperature, top_p=self.c.eval.sampled_top_p),
                ),
            ):
                res = evaluate(
                    self.sampler,
                    model,
                    self.encoder,
                    self.test_records,
                    batch_size=self.c.eval.batch_size,
                    key=jax.random.fold_in(self.key, 10**6 + step),
                    max_new=self.c.rl.max_response_len,
                    params=params,
                    stop_ids=self.stop_ids,
                    logit_bias=self.bias,
                )
                out.update(
                    {
                        f"{name}_accuracy": res["accuracy"],
                        f"{name}_format": res["format_rate"],
                        f"{name}_length": res["response_length"],
                    }
                )
        self.writer.write(f"eval_{label}", step, out)
        return out

    # ---------------------------------------------------------------- cold start
    def cold_start(self) -> None:
        c = self.c.cold_start
        tx, lr_fn = make_optimizer(
            "warmup_constant" if c.warmup_steps else "constant",
            c.learning_rate,
            c.warmup_steps,
            c.steps,
            self.c.rl.weight_decay,
            self.c.rl.b1,
            self.c.rl.b2,
            self.c.rl.grad_clip,
        )
        if self.meta["phase"] != "cold_start":
            return
        learner = Learner(self.graphdef, tx)
        opt = learner.init(self.params)
        if self.meta["global_step"]:
            state = self.restore({"params": self.params, "opt": opt})
            self.params, opt = state["params"], state["opt"]
        it = self.iterator("cold_start", c.batch_size)
        start = self.meta["phase_step"]
        for step in range(start + 1, c.steps + 1):
            t0 = time.perf_counter()
            records = multihost.gather_records(next(it))
            examples = [self.encoder.sft_example(r) for r in records]
            inputs, loss_mask = sft_batch(
                examples,
                self.cfg,
                self.special["<|endoftext|>"],
                self.c.sampling.prompt_buckets + (self.c.rl.max_prompt_len + self.c.rl.max_response_len,),
            )
            with self.ctx():
                grads, m = learner.sft_grads(self.params, as_batch(inputs), loss_mask, 1.0)
                self.params, opt, gnorm = learner.apply(self.params, opt, grads)
            check_finite(step, "cold_start", loss=m["loss"], grad_norm=gnorm)
            self.meta.update(phase_step=step, global_step=step)
            self.meta["data"]["cold_start"] = it.get_state()
            self.writer.write(
                "cold_start",
                step,
                {
                    "loss": m["loss"],
                    "grad_norm": gnorm,
                    "learning_rate": lr_fn(step),
                    "tokens": m["tokens"],
                    "step_s": time.perf_counter() - t0,
                    "compile_s": self.compile.take(),
                },
            )
            self.writer.progress("cold_start", step, c.steps, start, f"loss {float(m['loss']):.3f}")
            stop = multihost.any_process(self.preempt.requested)  # every process saves, then stops
            if step % self.c.checkpoint.every == 0 or step == c.steps or stop:
                self.save({"params": self.params, "opt": opt})
                if stop:
                    return self._preempted()

    # ---------------------------------------------------------------- GRPO
    def grpo(self) -> dict:
        c, rc = self.c.rl, self.c.reward
        tx, lr_fn = make_optimizer(
            c.schedule, c.learning_rate, c.warmup_steps, self.rl_steps, c.weight_decay, c.b1, c.b2, c.grad_clip
        )
        learner = Learner(self.graphdef, tx)
        if self.meta["phase"] == "cold_start":  # entering GRPO: the reference is the cold-start result
            self.meta.update(phase="grpo", phase_step=0)
            if self.c.cold_start.steps:
                self.meta["evals"]["cold_start"] = self.eval_all("cold_start", self.meta["global_step"])
            ref = jax.tree.map(jnp.copy, self.params)
            opt = learner.init(self.params)
        else:
            state = self.restore({"params": self.params, "opt": learner.init(self.params), "ref": self.params})
            self.params, opt, ref = state["params"], state["opt"], state["ref"]
        settings = GRPOSettings(c.clip_low, c.clip_high, c.dual_clip, c.kl_coef, c.kl_kind, c.loss_mode)
        refl = Reflection.from_config(self.c)
        rollout_params = SamplingParams(temperature=c.temperature, top_p=c.top_p)
        it = self.iterator("grpo", c.rollout_batch)
        n = c.num_generations
        offset = self.meta["global_step"] - self.meta["phase_step"]
        start = self.meta["phase_step"]
        pool = ThreadPoolExecutor(rc.threads)
        for step in range(start + 1, self.rl_steps + 1):
            gstep = offset + step
            key = jax.random.fold_in(self.key, gstep)
            times, t = {}, time.perf_counter()
            programs = self.sampler.compiled_programs()
            records = multihost.gather_records(next(it))
            policy = self.model()
            with self.ctx():
                ro = sample_rollouts(
                    self.sampler,
                    policy,
                    self.encoder,
                    records,
                    n=n,
                    key=key,
                    max_new=c.max_response_len,
                    params=rollout_params,
                    stop_ids=self.stop_ids,
                    logit_bias=self.bias,
                )
                times["rollout_s"], t = time.perf_counter() - t, time.perf_counter()
                if rc.reflection:
                    judge = policy if rc.judge == "policy" else self.model(ref)
                    reflect(
                        self.sampler,
                        judge,
                        self.encoder,
                        ro,
                        refl,
                        key=jax.random.fold_in(key, 1),
                        stop_ids=self.stop_ids,
                        logit_bias=self.bias,
                    )
                times["reflection_s"], t = time.perf_counter() - t, time.perf_counter()
                futures = score_async(pool, ro, refl.reward, rc.reflection, multihost.local_rows(len(ro.responses)))
                # While the host scores: the rows, their reference (and old) log-probs on device.
                rows = np.arange(len(ro.responses))
                micro = [rows[i : i + c.micro_batch] for i in range(0, len(rows), c.micro_batch)]
                batches = [
                    training_rows(ro, self.encoder, self.special["<|endoftext|>"], self.c.sampling.prompt_buckets, m)
                    for m in micro
                ]
                p_len, g_len = batches[0][2], batches[0][3]
                ref_lp = [learner.logprobs(ref, b[0], p_len - 1, g_len) for b in batches]
                old_lp = (
                    [learner.logprobs(self.params, b[0], p_len - 1, g_len) for b in batches]
                    if c.recompute_old_logprobs
                    else [ro.old_logp[m] for m in micro]
                )
                jax.block_until_ready((ref_lp, old_lp))
                times["logprobs_s"], t = time.perf_counter() - t, time.perf_counter()
                scores = [f.result() for f in futures]  # this process's rows
                table = multihost.gather_rows(
                    np.array([[s[k] for k in REWARD_KEYS] + ["error" in s] for s in scores], np.float32)
                )
                times["scoring_wait_s"], t = time.perf_counter() - t, time.perf_counter()
                reward = table[:, 0]
                adv = np.asarray(compute_advantages(jnp.asarray(reward), n, c.advantage))
                metrics = self._update(learner, settings, batches, micro, old_lp, ref_lp, adv, p_len, g_len, opt)
                opt = metrics.pop("_opt")
                times["update_s"] = time.perf_counter() - t
            errors = [s for s in scores if "error" in s]
            for s in errors[:3]:
                print(f"\nreward error at step {gstep}: {s['error']}", file=sys.stderr)
            comp = {k: float(table[:, j].mean()) for j, k in enumerate(REWARD_KEYS)}
            total_s = sum(times.values())
            tokens = float(ro.lengths.sum())
            log = {
                **{f"reward_{k}": v for k, v in comp.items()},
                **metrics,
                **times,
                "response_length": float(ro.lengths.mean()),
                "reward_errors": int(table[:, -1].sum()),
                "learning_rate": float(lr_fn(step)),
                "tokens_per_s": tokens / total_s,
                "new_programs": self.sampler.compiled_programs() - programs,
                "compile_s": self.compile.take(),
            }
            self.meta.update(phase_step=step, global_step=gstep)
            self.meta["data"]["grpo"] = it.get_state()
            self.writer.write("grpo", gstep, log)
            if step % self.c.log.samples_every == 0 or step == 1:
                for i in range(min(self.c.log.num_samples, len(ro.responses))):
                    self.writer.text(
                        "grpo",
                        gstep,
                        f"sample_{i}",
                        f"label: {ro.labels[i]}\nreward: {scores[i]}\n"
                        f"response: {ro.responses[i]}\ntext judge: {ro.text_answers and ro.text_answers[i]}"
                        f"\nimage judge: {ro.image_answers and ro.image_answers[i]}",
                    )
            self.writer.progress(
                "grpo",
                step,
                self.rl_steps,
                start,
                f"reward {comp['overall']:.3f} acc {comp['accuracy']:.2f} kl {log['kl']:.4f}",
            )
            state = {"params": self.params, "opt": opt, "ref": ref}
            if step % self.c.eval.every == 0 or step == self.rl_steps:
                ev = self.eval_all("grpo", gstep)
                if ev["greedy_accuracy"] > self.meta["best_accuracy"]:
                    self.meta["best_accuracy"] = ev["greedy_accuracy"]
                    self.save(state, best=True)
                self.meta["evals"]["grpo"] = ev
            stop = multihost.any_process(self.preempt.requested)
            if step % self.c.checkpoint.every == 0 or step == self.rl_steps or stop:
                self.save(state)
                if stop:
                    pool.shutdown()
                    return self._preempted()
        pool.shutdown()
        return self.meta["evals"]

    def _update(self, learner, settings, batches, micro, old_lp, ref_lp, adv, p_len, g_len, opt) -> dict:
        """One pass over the rollouts in mini-batches of update_batch prompts (one optimizer step each)."""
        c = self.c.rl
        per_step = c.update_batch * c.num_generations // c.micro_batch  # micro-batches per optimizer step
        sums, count = {}, 0
        for s in range(0, len(batches), per_step):
            group = range(s, s + per_step)
            if settings.loss_mode == "token":
                sizes = [float(batches[i][1].sum()) for i in group]
            else:
                sizes = [float(len(micro[i])) for i in group]
            total = max(sum(sizes), 1.0)
            grads = None
            for i, size in zip(group, sizes):
                batch, mask, _, _ = batches[i]
                g, m = learner.grpo_grads(
                    self.params,
                    batch,
                    p_len - 1,
                    g_len,
                    old_lp[i],
                    ref_lp[i],
                    adv[micro[i]],
                    mask,
                    size / total,
                    settings,
                )
                grads = learner.accumulate(grads, g)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            self.params, opt, gnorm = learner.apply(self.params, opt, grads)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gnorm) * per_step
            check_finite(self.meta["global_step"] + 1, "grpo", loss=sums.get("loss", 0.0), grad_norm=gnorm)
        out = {k: v / count for k, v in sums.items()}
        out["_opt"] = opt
        return out

    def _preempted(self):
        self.ckpt.wait()
        print(f"\nSIGTERM: saved step {self.meta['global_step']} to {self.ckpt.directory}; exiting")
        raise SystemExit(0)

    def close(self) -> None:
        self.compile.close()
        self.ckpt.close()
        self.best.close()
        self.writer.close()
        self.preempt.restore_handler()


def run(c: ConfigDict) -> dict:
    r = Run(c)
    try:
        r.resume_meta()
        if c.cold_start.steps:
            r.cold_start()
        if r.rl_steps:
            evals = r.grpo()
        else:
            evals = {"cold_start": r.eval_all("cold_start", r.meta["global_step"])}
        r.ckpt.wait()
        results = {
            "cold_start": evals.get("cold_start"),
            "grpo": evals.get("grpo"),
            "workdir": os.path.abspath(c.workdir),
        }
        if multihost.is_main():
            with open(os.path.join(c.workdir, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
            for name, ev in (("cold start", results["cold_start"]), ("GRPO", results["grpo"])):
                if ev:
                    print(
                        f"\nheld-out accuracy, {name}: greedy {ev['greedy_accuracy']:.3f}, "
                        f"sampled {ev['sampled_accuracy']:.3f}",
                        end="",
                    )
            print()
        return results
    finally:
        r.close()
