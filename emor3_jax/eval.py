"""Evaluates a policy on one or more data sets, each prompted with its own labels.

    # a run's latest step on its own test split (tiny: the synthetic set)
    python -m emor3_jax.eval --config=configs/qwen_vl.py --checkpoint=workdir/tiny --out=/tmp/eval

    # a Hugging Face checkpoint on EmoSet-2k test and Emotion6, 8 sampled runs, no SET prompt
    python -m emor3_jax.eval --config=configs/qwen_vl.py:3b --checkpoint=/ckpt/Qwen2.5-VL-3B-Instruct \\
        --config.data.test=/data/EmoSet-2k/test --datasets=test,emotion6 \\
        --config.eval.datasets.emotion6.path=/data/Emotion6 \\
        --config.eval.datasets.emotion6.annotations=/data/Emotion6/test.jsonl \\
        --samples=8 --plain --out=/tmp/eval-3b

--checkpoint: a workdir (its latest step), workdir/ckpt/N, workdir/best/N, or a local HF dir.
Without --out, a run's evaluation goes to <workdir>/eval (a step: <workdir>/eval-ckpt-N).
Data sets are `config.eval.datasets.<name>` (configs/qwen_vl.py). Per data set: greedy accuracy
with the policy's reflective judgements of its greedy answers, and k sampled runs at
eval.sampled_temperature / sampled_top_p (spec section 8). Writes to --out:
results.json, results.md, <name>_responses.jsonl, <name>_confusion.png. Data sets whose records
carry a truth (the synthetic set) also report the image-faithful and answer-coherent rates
(overall and per class) and each response's two flags; others leave them out.

Several processes (launch/README.md): every process runs the same command; each batch is
sampled on the global mesh and process 0 writes the reports.
"""

from __future__ import annotations

import json
import time
import zlib

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import ConfigDict, config_flags

from emor3_jax import cli, config_lib, factory
from emor3_jax.core import accelerator, multihost, paths
from emor3_jax.data import sources
from emor3_jax.data.splits import load_eval_records
from emor3_jax.emo_r3.task import EmoR3
from emor3_jax.evaluation import report as eval_report
from emor3_jax.evaluation.evaluate import HeldOutSettings, heldout, response_lines
from emor3_jax.load import load_policy, locate

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/qwen_vl.py[:variant]", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "workdir, workdir/{ckpt,best}/N, or a local HF checkpoint dir")
_DATASETS = flags.DEFINE_list("datasets", ["test"], "names in config.eval.datasets")
_OUT = flags.DEFINE_string(
    "out", None, "output directory (default: <workdir>/eval for a workdir, <workdir>/eval-ckpt-N for workdir/ckpt/N)"
)
_SAMPLES = flags.DEFINE_integer("samples", 4, "k: sampled runs per data set (mean and std reported)")
_PLAIN = flags.DEFINE_bool("plain", False, "ask without the SET prompt (the bare question)")


def evaluate_dataset(name: str, c: ConfigDict, policy, rt: factory.Runtime, k: int, use_set: bool):
    """(results.json entry, responses.jsonl lines, ids of the prompts dropped as too long) of
    data set `name`."""
    ds = c.eval.datasets[name]
    counter, dropped = {}, []
    labels = tuple(ds.labels)
    encoder = rt.encoder(labels, c.rl.max_prompt_len)
    task = EmoR3.from_config(c, labels, use_set)
    records = load_eval_records(ds, c, counter)
    # Prompts over rl.max_prompt_len are left out and listed, as the training data drops them.
    fits = lambda r: task.prompt_length(encoder, r)
    records = list(sources.drop_overlong(records, fits, c.rl.max_prompt_len, dropped))
    if not records:
        raise ValueError(f"data set {name!r}: no records (prompts dropped as too long: {len(dropped)})")
    if counter.get("bad"):
        print(f"{name}: skipped {counter['bad']} bad of {counter['seen']} records")
    if dropped:
        print(f"{name}: dropped {len(dropped)} prompts over rl.max_prompt_len: {[d['id'] for d in dropped]}")
    key = jax.random.fold_in(jax.random.key(c.seed), zlib.crc32(name.encode()))
    t = time.perf_counter()
    print(f"{name}: {len(records)} records, labels {', '.join(labels)}")

    def progress(setting: str, res: dict) -> None:
        runs = res["run_accuracies"]
        acc = f"{res['accuracy']:.3f}" if setting == "greedy" else f"{np.mean(runs):.3f} ± {np.std(runs):.3f}"
        print(f"{name}: {setting} accuracy {acc} ({time.perf_counter() - t:.0f} s)")

    settings = HeldOutSettings.from_config(c, samples=k, judge_greedy=True)  # the policy judges its greedy answers
    with rt.ctx():
        greedy, sampled = heldout(
            rt.sampler,
            policy.model,
            encoder,
            task,
            records,
            settings,
            (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)),
            progress,
        )
    return (
        eval_report.summarize(labels, greedy, sampled),
        response_lines(greedy, sampled, k),
        [d["id"] for d in dropped],
    )


def run_eval(c: ConfigDict, checkpoint: str, names: list[str], out: str, k: int, use_set: bool) -> dict:
    """Evaluates the policy at `checkpoint` on data sets `names`; writes the reports to `out`
    (process 0) and returns results.json's content."""
    # a hub id -> its local snapshot, before the checks read the paths; of the data, the test split
    # alone and only when evaluated (data set "test" follows data.test)
    config_lib.resolve_hub_ids(c, data_flags=("data.test",) if "test" in names else ())
    config_lib.validate_eval(c, names, k)
    mesh, rules = factory.mesh_and_rules(c)
    scratch = paths.Scratch(c.scratch_dir)
    try:
        policy = load_policy(checkpoint, c, mesh, rules, scratch)
    finally:
        scratch.close()
    rt = factory.build(c, policy.tokenizer, policy.special, policy.cfg, mesh, rules)
    results = {
        "checkpoint": paths.absolute(checkpoint),
        "step": policy.step,
        "use_set": use_set,
        "samples": k,
        "sampled_temperature": c.eval.sampled_temperature,
        "sampled_top_p": c.eval.sampled_top_p,
        "max_response_len": c.rl.max_response_len,
        "reward_compat": c.reward.compat,
        "datasets": {},
        "prompts_dropped": {},  # per data set: ids of the prompts over rl.max_prompt_len, left out
    }
    write = multihost.is_main()  # every process samples its part of each batch; one writes
    out_dir = epath.Path(out)  # local or a URI
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        summary, lines, dropped = evaluate_dataset(name, c, policy, rt, k, use_set)
        results["datasets"][name] = summary
        results["prompts_dropped"][name] = dropped
        if write:
            text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            (out_dir / f"{name}_responses.jsonl").write_text(text, encoding="utf-8")
            conf = summary["confusion"]["counts"]
            title = f"{name}: label (rows) vs greedy prediction (columns), n={summary['num_examples']}"
            with (out_dir / f"{name}_confusion.png").open("wb") as f:
                eval_report.confusion_image(conf, summary["labels"], title).save(f, format="PNG")
    if write:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        (out_dir / "results.md").write_text(eval_report.markdown(results), encoding="utf-8")
    if write:
        print("\n" + eval_report.summary_table(results["datasets"]))
        print(f"\nwrote {paths.absolute(out)}")
    return results


def default_out(checkpoint: str) -> str:
    """Where a run's evaluation goes without --out: into its workdir, next to what it evaluates."""
    where, step = locate(checkpoint)
    if where == "hf":
        raise ValueError(f"--checkpoint={checkpoint!r} is a Hugging Face checkpoint: pass --out=<directory>")
    workdir = paths.parent(where)
    return paths.join(workdir, "eval" if step is None else f"eval-{epath.Path(where).name}-{step}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint is required")
    out = _OUT.value or default_out(_CHECKPOINT.value)
    logging.set_verbosity(logging.WARNING)
    c = _CONFIG.value
    settings = accelerator.setup(config_lib.compile_cache_dir(c), c.gpu_memory_fraction)  # before a backend starts
    multihost.initialize()
    if multihost.is_main():
        print(settings, flush=True)
    run_eval(c, _CHECKPOINT.value, _DATASETS.value, out, _SAMPLES.value, not _PLAIN.value)


if __name__ == "__main__":
    cli.run(main)
