"""Does GRPO improve on its cold start? The tiny default on the synthetic emotion set, over
seeds, with and without the reflective reward (not a test: ~4 minutes per run on 2 cores).

    python bench/learning.py [--seeds 0 1 2] [--extra --config.rl.steps=60 ...]

Each run is the README's main job (`python -m emor3_jax.train --config=configs/qwen_vl.py`)
with another seed; the script reads each run's results.json (held-out accuracy after the cold
start and after GRPO, with the greedy image-faithful and answer-coherent rates) and
metrics.jsonl (training reward of the first and last GRPO steps, the judge's accuracy after the
cold start).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAITHFULNESS = ("image_faithful", "answer_coherent")  # greedy rates against the synthetic truth
WHEN = (("cold", "cold_start"), ("grpo", "grpo"))


def one_run(seed: int, reflection: bool, extra: list[str], root: str) -> dict:
    workdir = os.path.join(root, f"seed{seed}_{'rer' if reflection else 'plain'}")
    cmd = [
        sys.executable,
        "-m",
        "emor3_jax.train",
        f"--config={ROOT}/configs/qwen_vl.py",
        f"--config.workdir={workdir}",
        f"--config.seed={seed}",
        f"--config.reward.reflection={'both' if reflection else 'none'}",
        *extra,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        grpo = [json.loads(line) for line in f if '"phase": "grpo"' in line]
    k = max(1, len(grpo) // 5)  # first and last fifth of the GRPO steps
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        judge = [json.loads(line) for line in f if '"phase": "judge"' in line]
    return {
        "judge": judge[-1]["judge_accuracy"] if judge else float("nan"),  # nan: judge check off
        **{f"{when}_{k}": res[phase][f"greedy_{k}"] for when, phase in WHEN for k in FAITHFULNESS},
        "cold_greedy": res["cold_start"]["greedy_accuracy"],
        "cold_sampled": res["cold_start"]["sampled_accuracy"],
        "grpo_greedy": res["grpo"]["greedy_accuracy"],
        "grpo_sampled": res["grpo"]["sampled_accuracy"],
        "reward_first": float(np.mean([r["reward_overall"] for r in grpo[:k]])),
        "reward_last": float(np.mean([r["reward_overall"] for r in grpo[-k:]])),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more --config.* flags for every run")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="emor3-learning-")
    rows = {}
    for reflection in (True, False):
        for seed in args.seeds:
            r = one_run(seed, reflection, args.extra, root)
            rows[(reflection, seed)] = r
            print(
                f"{'RER ' if reflection else 'no RER'} seed {seed}: held-out greedy {r['cold_greedy']:.3f} -> "
                f"{r['grpo_greedy']:.3f}, sampled {r['cold_sampled']:.3f} -> {r['grpo_sampled']:.3f}; "
                f"training reward {r['reward_first']:.3f} -> {r['reward_last']:.3f}; "
                f"image-faithful {r['cold_image_faithful']:.3f} -> {r['grpo_image_faithful']:.3f}, "
                f"answer-coherent {r['cold_answer_coherent']:.3f} -> {r['grpo_answer_coherent']:.3f}; "
                f"judge {r['judge']:.3f}",
                flush=True,
            )
    for reflection in (True, False):
        rs = [rows[(reflection, s)] for s in args.seeds]
        mean = lambda k: float(np.mean([r[k] for r in rs]))
        std = lambda k: float(np.std([r[k] for r in rs]))
        name = "with RER" if reflection else "without RER"
        print(
            f"{name}: held-out sampled accuracy {mean('cold_sampled'):.3f}+-{std('cold_sampled'):.3f} (cold start) "
            f"-> {mean('grpo_sampled'):.3f}+-{std('grpo_sampled'):.3f} (GRPO); greedy {mean('cold_greedy'):.3f} -> "
            f"{mean('grpo_greedy'):.3f}; reward {mean('reward_first'):.3f} -> {mean('reward_last'):.3f}; "
            f"greedy image-faithful {mean('cold_image_faithful'):.3f} -> {mean('grpo_image_faithful'):.3f}"
            f"+-{std('grpo_image_faithful'):.3f}, answer-coherent {mean('cold_answer_coherent'):.3f} -> "
            f"{mean('grpo_answer_coherent'):.3f}+-{std('grpo_answer_coherent'):.3f}; judge {mean('judge'):.3f}"
        )
        tag = "rer" if reflection else "plain"
        print(
            f"ratio grpo_vs_cold_start_sampled_accuracy_{tag}: "
            f"{mean('grpo_sampled') / max(mean('cold_sampled'), 1e-9):.3f}"
        )


if __name__ == "__main__":
    main()
