"""Every bench still runs: each one's own side at its smallest settings through its entry point
(the `main` that `python -m bench.X` calls, in this process unless the bench itself starts
processes), checked on the lines it prints. A side that needs what this machine lacks (TRL's
venv .venv-trl, the reference script in shared/, a GPU) is skipped with a reason naming it.
bench/learning.py and bench/attribute_probe.py read trained runs, which take minutes: their smoke
runs read a crafted run (metrics and results files; a random tiny model's checkpoint) instead.
The second modes of sampling (realistic lengths, the GPU path on the CPU) and grpo_step
(realistic lengths) are slow-marked: CI runs each bench once, tests/README.md lists them.
Also: bench/gpu_grpo.py's FLOPs formula reproduces EasyR1's (verl's) count for the 3B model."""

import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_PYTHON = os.path.join(ROOT, ".venv-trl", "bin", "python")
TRL_SCRIPT = os.path.join(ROOT, "..", "shared", "bench", "trl_grpo_cpu.py")
RATIO = r"^ratio {}: \d+\.\d+$"


def run_main(module: str, argv: list[str], capsys, monkeypatch) -> str:
    """`python -m module *argv`, in this process; what it printed."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    importlib.import_module(module).main()
    return capsys.readouterr().out


def assert_ratios(out: str, *names: str) -> None:
    for name in names:
        assert re.search(RATIO.format(name), out, re.M), f"no `ratio {name}` line:\n{out}"


def one_device_env() -> dict:
    """The environment without this session's 8 fake CPU devices: a bench whose mesh takes every
    device runs as on a real CPU machine (one device)."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def test_forward_small(capsys, monkeypatch):
    out = run_main("bench.forward", ["--small", "--batch", "1", "--text", "16", "--iters", "1"], capsys, monkeypatch)
    assert "batch 1 x 82 tokens" in out, out  # 16 text + 64 image + 2 vision start/end tokens
    assert_ratios(out, "forward_vs_transformers", "forward_backward_vs_transformers")


def test_sampling_small(capsys, monkeypatch):
    """Both sides, each in its own process (python -m bench.sampling --side ...), as the bench runs them."""
    argv = ["--small", "--prompts", "1", "--n", "2", "--new", "4"]
    out = run_main("bench.sampling", argv, capsys, monkeypatch)
    assert "ours (prefill once + fork)" in out and "for 8 tokens" in out, out  # 1 prompt x n=2 x 4 tokens
    assert_ratios(out, "sampling_vs_transformers", "fork_vs_prefill_each")


@pytest.mark.slow  # a second mode of a bench CI already runs; about a minute on 2 cores
def test_sampling_realistic_lengths(capsys, monkeypatch):
    argv = ["--lengths", "realistic", "--prompts", "2", "--n", "2", "--new", "8", "--slots", "4", "--page_size", "16"]
    out = run_main("bench.sampling", argv, capsys, monkeypatch)
    assert "2 prompts (224x224 image, 128-token prompt) x n=2 = 4 rows" in out, out
    assert_ratios(out, "continuous_vs_static", "paged_vs_contiguous", "kv_entries_contiguous_over_paged")


@pytest.mark.slow  # a second mode of a bench CI already runs; about a minute on 2 cores
def test_sampling_gpu_path_on_cpu(capsys, monkeypatch):
    out = run_main("bench.sampling", ["--smoke", "--n", "2", "--new", "4"], capsys, monkeypatch)
    assert "4 rows x 4 new tokens" in out and "decode step" in out, out  # --smoke: 2 prompts


@pytest.mark.slow  # ~45 s of CI (two trainer steps in a subprocess); the trainer's steps: tests/test_train.py
def test_grpo_step_small():
    """The real trainer for two GRPO steps on the small model; the phase table from its metrics.
    As the bench runs, on one CPU device (the suite's 8 fake ones would only slow it down)."""
    cmd = [sys.executable, "-m", "bench.grpo_step", "--small", "--steps", "2", "--response", "40"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=one_device_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for phase in ("rollout_s", "reflection_s", "logprobs_s", "scoring_wait_s", "update_s", "total"):
        assert re.search(rf"^{phase} +\d+\.\d\d s +\d+\.\d\d s$", out, re.M), f"no row for {phase}:\n{out}"
    assert re.search(r"^tokens/s \(rollout tokens over step time\): \d+$", out, re.M), out


@pytest.mark.slow  # a second mode of a bench CI already runs; about a minute on 2 cores
def test_grpo_step_realistic_lengths(capsys, monkeypatch):
    argv = ["--lengths", "realistic", "--prompts", "2", "--n", "2", "--new", "16", "--micro", "4", "--iters", "1"]
    out = run_main("bench.grpo_step", argv, capsys, monkeypatch)
    for side in ("padded", "packed"):
        assert re.search(rf"^{side} +padding", out, re.M), out
    assert_ratios(out, "packed_vs_padded", "packed_vs_padded_logprobs")


def needs_reference_script():
    if not os.path.exists(TRL_SCRIPT):
        pytest.skip(f"no TRL reference script at {os.path.normpath(TRL_SCRIPT)} (shared/ beside the repo)")


@pytest.mark.slow  # 46 s on 2 cores; CI runs the GRPO step's own bench (test_grpo_step_small)
def test_grpo_vs_trl_ours_only(tmp_path):
    """Our GRPO step on the reference script's checkpoint (built here), with and without RER."""
    needs_reference_script()
    cmd = [sys.executable, "-m", "bench.grpo_vs_trl", "--ours-only", "--steps", "2", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=one_device_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for row in ("generate", "reward", "reference", "update", "reflection", "step_total"):
        assert re.search(rf"^{row} +\d+\.\d{{3}} +\d+\.\d{{3}}$", out, re.M), f"no row for {row}:\n{out}"
    assert re.search(r"^same batch, ours: loss \S+ -> \S+$", out, re.M), out
    assert (tmp_path / "batch.npz").exists()  # what TRL's side of the same-batch check reads


def test_grpo_vs_trl_against_trl(tmp_path):
    """The whole bench at its smallest length (2 steps: the first compiles) against TRL."""
    needs_reference_script()
    if not os.path.exists(TRL_PYTHON):
        pytest.skip(f"TRL's venv is missing ({TRL_PYTHON}); bench/grpo_vs_trl.py's VENV_HELP says how to make it")
    cmd = [sys.executable, "-m", "bench.grpo_vs_trl", "--steps", "2", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=one_device_env(), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "moves the same way: yes" in proc.stdout, proc.stdout
    assert_ratios(proc.stdout, "grpo_step_vs_trl", "grpo_step_rer_vs_trl")


@pytest.mark.slow  # the GPU bench's code path on CPU, about a minute; on a GPU: test_gpu_benches_on_a_gpu
def test_gpu_grpo_smoke(tmp_path):
    out = tmp_path / "gpu_grpo.json"
    env = dict(one_device_env(), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_grpo", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.split()[:3] == ["phase", "compile", "s"] for line in lines), proc.stdout
    for phase in ("sampling", "update", "ref_logprobs", "grpo_step"):
        row = [line for line in lines if line.startswith(phase + " ")]
        assert row and "skipped" not in row[-1], f"no table row for {phase}:\n{proc.stdout}"
    assert re.search(r"^ratio tokens_per_gpu_vs_easyr1: \d+\.\d\d$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^ratio mfu_vs_easyr1: n/a$", proc.stdout, re.M), proc.stdout  # CPU: no peak FLOP/s
    data = json.loads(out.read_text())
    assert set(data["phases"]) == {"sampling", "update", "ref_logprobs", "grpo_step"}
    assert data["phases"]["sampling"]["tokens"] == 2 * 8 * 8  # 2 prompts x n=8 x 8 new tokens, none cut short
    assert data["phases"]["update"]["tokens"] == 16 * (40 + 8)  # 16 rows of prompt 40 + response 8


def test_gpu_benches_on_a_gpu(tmp_path):
    """bench/gpu_grpo.py and bench/sampling.py --gpu at tiny shapes on the GPU itself."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no GPU here (nvidia-smi not found): bench/gpu_grpo.py and bench/sampling.py --gpu need one")
    env = dict(os.environ, JAX_PLATFORMS="cuda")
    for argv in (["bench.gpu_grpo", "--smoke"], ["bench.sampling", "--gpu", "--smoke"]):
        proc = subprocess.run(
            [sys.executable, "-m", *argv], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert re.search(r"(H100|H200|A100|GPU|NVIDIA).*: random tiny model", proc.stdout), proc.stdout


def test_text_flops_matches_easyr1_formula():
    mod = importlib.import_module("bench.gpu_grpo")
    from emor3_jax.models.qwen25_vl.config import preset

    cfg = preset("3b")
    # Worked by hand for Qwen2.5-VL-3B (D 2048, F 11008, L 36, 16 heads, 2 kv heads of 128, V 151936):
    # per layer 3*2048*11008 + 2048*128*(16+2+2+16) = 77,070,336; N = 36 * that + 2*151936*2048
    n = 3_396_861_952
    attn = 12 * 1088**2 * 128 * 16 * 36  # one row of 1088 tokens
    assert mod.text_flops(cfg, [1088], train=True) == 6 * n * 1088 + attn
    assert mod.text_flops(cfg, [1088, 1088], train=False) == 2 * (6 * n * 1088 + attn) / 3
    # Counting k/v at the full 16 heads (ignoring GQA) would give N = 3,661,103,104 instead.


# ---------------------------------------------------------------- bench/learning.py on a crafted run

# Per arm: sampled accuracy (cold start -> after GRPO) and the faithfulness rates after GRPO.
CRAFTED = {
    "no RER": dict(cold=0.5, grpo=0.6, faithful=0.4),
    "RER, policy judge": dict(cold=0.5, grpo=0.75, faithful=0.8),
}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def craft_learning_runs(root, seeds):
    """What bench/learning.py reads of each finished run: results.json, metrics.jsonl."""
    learning = importlib.import_module("bench.learning")
    for seed in seeds:
        cold_dir = root / f"seed{seed}" / "cold_start"
        kinds = {"judge_kind_text": 0.9, "judge_kind_image_wrong_light": 0.5 + 0.25 * int(seed)}
        judge = {"phase": "judge", "step": 10, "judge_text": 0.9, "judge_image": 0.7, **kinds}
        write_jsonl(cold_dir / "metrics.jsonl", [judge])
        for arm, v in CRAFTED.items():
            held = lambda acc, faithful: {k: faithful if k in learning.FAITHFUL else acc for k in learning.HELD_OUT}
            workdir = pathlib.Path(learning.arm_dir(str(root), seed, arm))
            workdir.mkdir(parents=True)
            res = {"cold_start": held(v["cold"], 0.3), "grpo": held(v["grpo"], v["faithful"])}
            (workdir / "results.json").write_text(json.dumps(res))
            evals = [{k: 0.5 for k in learning.EVAL_CURVES}, {k: 0.6 for k in learning.EVAL_CURVES}]
            train = {k: 0.5 for k in learning.TRAIN_CURVES}
            write_jsonl(
                workdir / "metrics.jsonl",
                [
                    {"phase": "eval_cold_start", "step": 10, **evals[0]},
                    {"phase": "grpo", "step": 11, **train},
                    {"phase": "grpo", "step": 12, **train},
                    {"phase": "eval_grpo", "step": 12, **evals[1]},
                ],
            )


def test_learning_report_of_crafted_runs(tmp_path, capsys, monkeypatch):
    seeds = ["0", "1"]
    craft_learning_runs(tmp_path, seeds)
    argv = ["--out", str(tmp_path), "--seeds", *seeds, "--report_only", "--arms", *CRAFTED]
    out = run_main("bench.learning", argv, capsys, monkeypatch)
    # 0.6 / 0.5 and 0.75 / 0.5; faithfulness 0.8 / 0.4 (the same in every seed: std 0)
    assert re.search(r"^ratio grpo_vs_cold_start_sampled_accuracy_no_rer: 1\.200$", out, re.M), out
    assert re.search(r"^ratio grpo_vs_cold_start_sampled_accuracy_rer_policy_judge: 1\.500$", out, re.M), out
    assert re.search(r"^ratio rer_policy_judge_vs_no_rer_greedy_image_faithful: 2\.000$", out, re.M), out
    assert "| GRPO, RER, policy judge | 0.750 ± 0.000 |" in out, out
    # paired: greedy acc 0.75 - 0.6, image-faithful 0.8 - 0.4 in both seeds
    assert "| greedy acc | +0.150 ± 0.000 (+0.15, +0.15) |" in out, out
    assert "| sampled image-faithful | +0.400 ± 0.000 (+0.40, +0.40) |" in out, out
    # the judge per kind, per seed and the mean: wrong light 0.5 and 0.75
    assert "| judge | image_wrong_light | text |" in out, out
    assert "| seed 1 | 0.750 | 0.900 |" in out and "| mean | 0.625 | 0.900 |" in out, out
    assert (tmp_path / "learning.md").read_text().count("| GRPO,") == 2
    assert (tmp_path / "learning.png").stat().st_size > 0


# ---------------------------------------------------------------- bench/attribute_probe.py on a crafted run


def craft_checkpoint(workdir, detail="size"):
    """A random tiny model saved as a run's checkpoint (step 1) with the tiny config, its
    synthetic step 1s naming `detail`."""
    from flax import nnx

    from bench.common import make_mesh
    from configs.qwen_vl import get_config
    from emor3_jax.core import sharding
    from emor3_jax.models.api import architecture, create_model, preset
    from emor3_jax.run_checkpoints import RunCheckpoints

    c = get_config("tiny")
    c.workdir = str(workdir)
    c.data.synthetic_detail = detail
    cfg = preset("tiny", vocab_size=1024, param_dtype=c.model.param_dtype)
    _, params = nnx.split(create_model(cfg, make_mesh(), sharding.DEFAULT_RULES))
    ckpts = RunCheckpoints(c, architecture(cfg))
    ckpts.save({"global_step": 1}, {"params": params}, {})
    ckpts.wait()
    ckpts.close()
    return c


def test_attribute_probe_reads_the_size(tmp_path):
    """The size's pixel reading orders each label's classes, and the policy's size words are read
    as faithfulness reads them (no word: medium)."""
    from bench.attribute_probe import pixel_accuracy, policy_attributes
    from emor3_jax.data.synthetic import FIGURES, make_example

    train = [make_example(i, 0, 56, "train") for i in range(96)]
    test = [make_example(i, 0, 56, "test") for i in range(24)]
    assert pixel_accuracy(train, test, "size") > 1 / 3  # above chance; the tower's share is in docs/results.md
    rows, sizes = [], ("small ", "", "huge ")
    for i, ex in enumerate(test[:6]):
        colour, noun = FIGURES[ex["label"]]
        drawn = ex["truth"]["size_class"]
        said = sizes[drawn] if i % 2 == 0 else sizes[(drawn + 1) % 3]
        rows.append({"id": f"test-{i}", "response": f"<step1>a {said}{colour} {noun}</step1><step2>x</step2>"})
    write_jsonl(tmp_path / "responses.jsonl", rows)
    shares, named = policy_attributes(str(tmp_path / "responses.jsonl"), 0, 56, "size")
    assert shares == {"figure": 1.0, "colour": 1.0, "size": 0.5}
    assert sum(sum(c.values()) for c in named.values()) == 6


# The size's reading and naming without a checkpoint: test_attribute_probe_reads_the_size (CI).
@pytest.mark.parametrize("detail", [pytest.param("size", marks=pytest.mark.slow), "light"])
def test_attribute_probe_on_a_crafted_checkpoint(tmp_path, capsys, monkeypatch, detail):
    from emor3_jax.data.synthetic import FIGURES, make_example

    c = craft_checkpoint(tmp_path / "run", detail)
    rows = []
    for i in range(12):  # responses naming each test image's figure and detail, the colour of 2 of 3 wrong
        ex = make_example(i, c.seed, c.data.image_size, "test", detail=detail)
        colour, noun = FIGURES[ex["label"]]
        colour = colour if i % 3 == 0 else "green"
        if detail == "size":
            step1 = f"a {('small', '', 'huge')[ex['truth']['size_class']]} {colour} {noun}"
        else:
            step1 = f"a {colour} {noun} by {('night', 'day')[ex['truth']['light']]}"
        rows.append({"id": f"test-{i}", "response": f"<step1>{step1}</step1><step2>x</step2>"})
    write_jsonl(tmp_path / "test_responses.jsonl", rows)
    argv = ["--checkpoint", str(tmp_path / "run"), "--responses", str(tmp_path / "test_responses.jsonl")]
    # 24 training images leave some label x class cells empty: numpy warns on their medians (the
    # pixel figure means nothing at this size; the smoke run checks that every part runs).
    out = run_main("bench.attribute_probe", [*argv, "--train", "24", "--test", "12"], capsys, monkeypatch)
    assert f"step 1: the {detail} of 12 test images" in out, out
    assert re.search(r"^vision probe: MLP \d\.\d{3}, linear \d\.\d{3}$", out, re.M), out
    # "green" is no colour word of the vocabulary: the figure is named, its colour is not
    assert f"policy (greedy step 1 names the drawn one): figure 1.000, colour 0.333, {detail} 1.000" in out, out
    assert re.search(r"^ratio policy_vs_vision_probe: \d+\.\d{3}$", out, re.M), out
