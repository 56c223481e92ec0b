"""Does GRPO improve on its cold start, and does the reflective reward keep the reasoning
faithful? The tiny default on the synthetic emotion set, over seeds, in three arms from the
same cold start (not a test: ~4 minutes per cold start and ~3 per arm on 2 cores):

    no RER              GRPO with reward.reflection=none
    RER, policy judge   reward.reflection=both, reward.judge=policy (the policy answers its reflections)
    RER, reference judge  reward.reflection=both, reward.judge=reference (the frozen cold-start model does)

    python -m bench.learning [--seeds 0 1 2 3 4] [--out DIR] [--extra --config.rl.steps=60 ...]
    python -m bench.learning --out DIR --seeds 0 1 --report_only   # the table of finished runs

The image side needs step 1 to name what the tiny model sees (docs/results.md, "A detail the
tiny model sees"): the light, taught by a 900-step cold start. Such a cold start also leaves the
policy nearly faithful on both sides, with nothing left for a reward to raise, so half its
answers carry a wrong detail (not a quarter): issue 25's run, 60 GRPO steps,

    python -m bench.learning --out DIR --extra --config.data.synthetic_detail=light \
        --config.data.unfaithful_share=0.5 --config.cold_start.steps=900 \
        --config.cold_start.judge_records=64 --config.rl.steps=60

(about 28 minutes per seed on 2 cores: 14 for the cold start, 4-5 per arm; docs/learning_light.md).

Per seed the README's main job (`python -m emor3_jax.train --config=configs/qwen_vl.py`) runs
its cold start alone (rl.steps = rl.epochs = 0); each arm resumes a copy of that workdir with
its reward settings (--accept_changes) and runs GRPO. The script reads each arm's results.json
(held-out accuracy, format and the faithfulness rates against the synthetic truth, greedy
and sampled: greedy decoding hides what the policy still samples) and metrics.jsonl (training
reward components per GRPO step, validation every eval.every steps, the judge's accuracy after
the cold start, which the tiny job measures: cold_start.judge_records), prints
mean +- std over seeds (std with ddof 1), the paired per-seed differences of each RER arm
from no RER, the judge's accuracy per kind of question, and writes DIR/learning.md (the table) and
DIR/learning.png (the curves; needs the `bench` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from emor3_jax.evaluation.report import markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {  # arm -> its reward flags; the cold start runs with the config's defaults
    "no RER": ["--config.reward.reflection=none"],
    "RER, policy judge": ["--config.reward.reflection=both", "--config.reward.judge=policy"],
    "RER, reference judge": ["--config.reward.reflection=both", "--config.reward.judge=reference"],
    # Not run by default (--arms): reward.no_span's other setting, against the default "zero"
    "RER, policy judge, no_span neutral": [
        "--config.reward.reflection=both",
        "--config.reward.judge=policy",
        "--config.reward.no_span=neutral",
    ],
}
DEFAULT_ARMS = ("no RER", "RER, policy judge", "RER, reference judge")
ACCEPT = "--accept_changes=reward.reflection,reward.judge,reward.no_span"
# Held-out figures of results.json (greedy and sampled decoding): the table's columns.
HELD_OUT = {
    "greedy_accuracy": "greedy acc",
    "sampled_accuracy": "sampled acc",
    "greedy_format": "greedy format",
    "sampled_format": "sampled format",
    "greedy_image_faithful": "image-faithful",
    "greedy_answer_coherent": "answer-coherent",
    "sampled_image_faithful": "sampled image-faithful",
    "sampled_answer_coherent": "sampled answer-coherent",
}
FAITHFUL = ("greedy_image_faithful", "greedy_answer_coherent", "sampled_image_faithful", "sampled_answer_coherent")
# Curves: training reward components per GRPO step (without RER coherence = consistency = 1)
# and validation rates every eval.every steps (step 0: the cold start).
TRAIN_CURVES = ("reward_overall", "reward_accuracy", "reward_format", "reward_coherence", "reward_consistency")
EVAL_CURVES = (
    "greedy_accuracy",
    "greedy_format",
    "greedy_image_faithful",
    "greedy_answer_coherent",
    "sampled_image_faithful",
    "sampled_answer_coherent",
)


def train(workdir: str, seed: int, flags: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "emor3_jax.train",
        f"--config={ROOT}/configs/qwen_vl.py",
        f"--config.workdir={workdir}",
        f"--config.seed={seed}",
        *flags,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def finished(workdir: str, phase: str) -> bool:
    """Whether workdir's run wrote its results after `phase` (a rerun of the bench reuses it)."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f)[phase] is not None


def cold_start(seed: int, extra: list[str], root: str) -> None:
    """Runs seed's cold start alone (the overrides come last: they win over `extra`); a
    finished one is kept, an interrupted one resumes."""
    workdir = os.path.join(root, f"seed{seed}", "cold_start")
    if not finished(workdir, "cold_start"):
        train(workdir, seed, [*extra, "--config.rl.steps=0", "--config.rl.epochs=0"])


def arm_run(seed: int, arm: str, cold: str, extra: list[str], root: str) -> dict:
    """GRPO of `arm` from a copy of the cold start's workdir: held-out figures after the cold
    start ("cold_*") and after GRPO ("grpo_*"), the judge's accuracy, the curves."""
    workdir = arm_dir(root, seed, arm)
    if not finished(workdir, "grpo"):  # a finished arm is kept, an interrupted one resumes
        if not os.path.exists(workdir):
            shutil.copytree(cold, workdir, ignore=shutil.ignore_patterns("run.lock"))
        # The judge is measured once, after the cold start (the resume cuts the copied log back
        # to the checkpoint, so its line is read from the cold start's own log).
        train(workdir, seed, [*extra, *ARMS[arm], "--config.cold_start.judge_records=0", ACCEPT])
    return read_arm(workdir, cold)


def read_arm(workdir: str, cold: str) -> dict:
    """An arm's figures from its workdir and its cold start's (see arm_run)."""
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    metrics = read_metrics(workdir)
    judge = [m for m in read_metrics(cold) if m["phase"] == "judge"]
    offset = [m for m in metrics if m["phase"] == "eval_cold_start"][-1]["step"]  # the cold start's last step
    evals = [m for m in metrics if m["phase"] in ("eval_cold_start", "eval_grpo")]
    return {
        **{f"cold_{k}": res["cold_start"][k] for k in HELD_OUT},
        **{f"grpo_{k}": res["grpo"][k] for k in HELD_OUT},
        **{f"judge_{k}": judge[-1][f"judge_{k}"] if judge else float("nan") for k in ("text", "image")},
        "judge_kinds": {
            k.removeprefix("judge_kind_"): v for k, v in (judge or [{}])[-1].items() if k.startswith("judge_kind_")
        },
        "train": {k: [(m["step"] - offset, m[k]) for m in metrics if m["phase"] == "grpo"] for k in TRAIN_CURVES},
        "eval": {k: [(m["step"] - offset, m[k]) for m in evals] for k in EVAL_CURVES},
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def table(runs: dict, seeds: list[int]) -> str:
    """Markdown: the cold start (the same for every arm) and each arm after GRPO, mean +- std."""
    cell = lambda values: "{:.3f} ± {:.3f}".format(*mean_std(values))
    head = ["", *HELD_OUT.values(), "judge text / image"]
    first = runs[next(iter(runs))]
    judge = [f"{mean_std([first[s][f'judge_{k}'] for s in seeds])[0]:.3f}" for k in ("text", "image")]
    rows = [["cold start", *(cell([first[s][f"cold_{k}"] for s in seeds]) for k in HELD_OUT), " / ".join(judge)]]
    for arm in runs:
        rows.append([f"GRPO, {arm}", *(cell([runs[arm][s][f"grpo_{k}"] for s in seeds]) for k in HELD_OUT), ""])
    return markdown_table(head, rows)


def paired(runs: dict, seeds: list[int]) -> str:
    """Markdown: per held-out figure (a row) and RER arm (a column), the arm's figure after GRPO
    minus no RER's, seed by seed (each pair shares its cold start): mean +- std (ddof 1) and
    the per-seed values."""
    arms = [arm for arm in runs if arm != "no RER"]
    rows = []
    for k, name in HELD_OUT.items():
        cells = []
        for arm in arms:
            diffs = [runs[arm][s][f"grpo_{k}"] - runs["no RER"][s][f"grpo_{k}"] for s in seeds]
            cells.append("{:+.3f} ± {:.3f} ({})".format(*mean_std(diffs), ", ".join(f"{d:+.2f}" for d in diffs)))
        rows.append([name, *cells])
    return markdown_table(["minus no RER, paired by seed", *arms], rows)


def judge_table(runs: dict, seeds: list[int]) -> str:
    """Markdown: the judge's accuracy per kind of reflection question after each seed's cold
    start, and the mean over seeds (every seed asks as many questions of each kind)."""
    first = runs[next(iter(runs))]
    kinds = sorted({k for s in seeds for k in first[s]["judge_kinds"]})
    if not kinds:
        return "(no judge measured: cold_start.judge_records=0)"
    value = lambda s, k: first[s]["judge_kinds"].get(k, float("nan"))
    rows = [[f"seed {s}", *(f"{value(s, k):.3f}" for k in kinds)] for s in seeds]
    rows.append(["mean", *(f"{np.mean([value(s, k) for s in seeds]):.3f}" for k in kinds)])
    return markdown_table(["judge", *kinds], rows)


def curve(runs: dict, seeds: list[int], part: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) over seeds of one curve (every seed logs the same steps)."""
    points = [runs[seed][part][key] for seed in seeds]
    steps = np.array([s for s, _ in points[0]])
    values = np.array([[v for _, v in p] for p in points])
    return steps, values.mean(0), values.std(0, ddof=1) if len(seeds) > 1 else np.zeros(len(steps))


def plot(runs: dict, seeds: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train", k) for k in TRAIN_CURVES] + [("eval", k) for k in EVAL_CURVES]
    fig, axes = plt.subplots(4, 3, figsize=(13, 13), sharex=True)
    for ax, (part, key) in zip(axes.flat, panels):
        for arm in runs:
            steps, mean, std = curve(runs[arm], seeds, part, key)
            ax.plot(steps, mean, marker="." if part == "eval" else None, label=arm)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(f"{key} ({'training rollouts' if part == 'train' else 'held-out'})", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("GRPO step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"tiny EMO-R3 on the synthetic set, mean ± std over seeds {seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def arm_dir(root: str, seed: int, arm: str) -> str:
    return os.path.join(root, f"seed{seed}", arm.replace(" ", "_").replace(",", ""))


def report(runs: dict, seeds: list[int], extra: list[str], root: str) -> None:
    """Prints the tables (per arm, paired, the judge) and the ratio lines; writes root/learning.md
    and root/learning.png."""
    md = "\n\n".join([table(runs, seeds), paired(runs, seeds), judge_table(runs, seeds)])
    print(md)
    plain = lambda k: mean_std([runs["no RER"][s][f"grpo_{k}"] for s in seeds])[0]
    for arm in runs:
        grpo = lambda k, a=arm: mean_std([runs[a][s][f"grpo_{k}"] for s in seeds])[0]
        cold = mean_std([runs[arm][s]["cold_sampled_accuracy"] for s in seeds])[0]
        tag = arm.replace(" ", "_").replace(",", "").lower()
        print(f"ratio grpo_vs_cold_start_sampled_accuracy_{tag}: {grpo('sampled_accuracy') / max(cold, 1e-9):.3f}")
        if arm != "no RER":
            for k in FAITHFUL:
                print(f"ratio {tag}_vs_no_rer_{k}: {grpo(k) / max(plain(k), 1e-9):.3f}")
    with open(os.path.join(root, "learning.md"), "w") as f:
        f.write(f"Seeds {seeds}, extra flags {extra or 'none'}; mean ± std (ddof 1) over seeds.\n\n{md}\n")
    plot(runs, seeds, os.path.join(root, "learning.png"))
    print(f"wrote {root}/learning.md and {root}/learning.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="", help="where the runs, learning.md and learning.png go (default: a temp dir)")
    ap.add_argument("--report_only", action="store_true", help="only read the finished runs under --out")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS), help="the GRPO arms")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more --config.* flags for every run")
    args = ap.parse_args()
    if args.report_only and not args.out:
        ap.error("--report_only reads the runs under --out: pass --out")
    root = args.out or tempfile.mkdtemp(prefix="emor3-learning-")
    if "no RER" not in args.arms:
        ap.error("--arms must include 'no RER': every other arm is compared with it")
    runs = {arm: {} for arm in args.arms}
    for seed in args.seeds:
        cold = os.path.join(root, f"seed{seed}", "cold_start")
        if not args.report_only:
            cold_start(seed, args.extra, root)
        for arm in args.arms:
            if args.report_only:
                r = runs[arm][seed] = read_arm(arm_dir(root, seed, arm), cold)
            else:
                r = runs[arm][seed] = arm_run(seed, arm, cold, args.extra, root)
            print(
                f"seed {seed} {arm}: "
                + ", ".join(f"{HELD_OUT[k]} {r[f'cold_{k}']:.3f} -> {r[f'grpo_{k}']:.3f}" for k in HELD_OUT)
                + f"; judge text {r['judge_text']:.3f} image {r['judge_image']:.3f}",
                flush=True,
            )
    report(runs, args.seeds, args.extra, root)


if __name__ == "__main__":
    main()
