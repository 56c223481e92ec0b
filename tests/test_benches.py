"""bench/gpu_grpo.py: the --smoke run (tiny shapes, CPU) prints its table and ratio lines, and its
FLOPs formula reproduces EasyR1's (verl's) count for the 3B text model."""

import importlib.util
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_grpo.py")


def test_gpu_grpo_smoke(tmp_path):
    out = tmp_path / "gpu_grpo.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300
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


def test_text_flops_matches_easyr1_formula():
    spec = importlib.util.spec_from_file_location("gpu_grpo", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from emor3_jax.models.qwen25_vl.config import preset

    cfg = preset("3b")
    # Worked by hand for Qwen2.5-VL-3B (D 2048, F 11008, L 36, 16 heads, 2 kv heads of 128, V 151936):
    # per layer 3*2048*11008 + 2048*128*(16+2+2+16) = 77,070,336; N = 36 * that + 2*151936*2048
    n = 3_396_861_952
    attn = 12 * 1088**2 * 128 * 16 * 36  # one row of 1088 tokens
    assert mod.text_flops(cfg, [1088], train=True) == 6 * n * 1088 + attn
    assert mod.text_flops(cfg, [1088, 1088], train=False) == 2 * (6 * n * 1088 + attn) / 3
    # Counting k/v at the full 16 heads (ignoring GQA) would give N = 3,661,103,104 instead.
