"""Several processes, one run: launch detection, and the tiny trainer on 2 local processes
(4 CPU devices each, localhost coordinator, gloo collectives) against 1 process with the same
8 devices and the same global batches."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_train import ROOT, _flags, _params

from emor3_jax.multihost import launch_mode

STEPS = {"cold_start.steps": 2, "rl.steps": 2, "eval.every": 2}


def test_launch_mode():
    assert launch_mode({}) == "single"
    explicit = {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert launch_mode(explicit) == "explicit"
    with pytest.raises(ValueError, match=r"\['JAX_PROCESS_ID'\] missing"):
        launch_mode({k: v for k, v in explicit.items() if k != "JAX_PROCESS_ID"})
    assert launch_mode({"TPU_WORKER_HOSTNAMES": "w0"}) == "single"  # a one-worker TPU VM
    assert launch_mode({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"
    assert launch_mode({"SLURM_NTASKS": "1"}) == "single"
    assert launch_mode({"SLURM_NTASKS": "2"}) == "slurm"


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = ROOT
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "emor3_jax.train"]
    port = _free_port()
    procs = [
        subprocess.Popen(
            cmd + _flags(two, **STEPS),
            env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    single = subprocess.run(
        cmd + _flags(one, **STEPS), env=_env(8), capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    assert "multi-process (explicit): 2 processes, 8 devices (4 per process)" in outs[0]
    assert "held-out accuracy" in outs[0] and "held-out accuracy" not in outs[1]  # process 0 reports

    # Cold start (step 2): real gradients, the same to float precision.
    _, sft_one = _params(one, 2)
    _, sft_two = _params(two, 2)
    assert sft_one.keys() == sft_two.keys()
    for name in sft_one:
        np.testing.assert_allclose(sft_two[name], sft_one[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # GRPO (steps 3-4): the same rollouts and rewards, scored half on each process and gathered.
    metrics = lambda w: [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward_overall", "reward_accuracy", "reward_format", "reward_coherence", "response_length")
    grpo = lambda rows: [[r["step"]] + [r[k] for k in keys] for r in rows if r["phase"] == "grpo"]
    assert grpo(metrics(two)) == grpo(metrics(one)) and len(grpo(metrics(one))) == 2
    # A random model's rewards are all equal, so the advantages are 0 and the GRPO gradient is
    # rounding noise (~1e-6) that Adam scales to +-lr per step: the params agree to 2 * lr * steps.
    step_one, params_one = _params(one)
    step_two, params_two = _params(two)
    assert step_one == step_two == 4
    for name in params_one:
        np.testing.assert_allclose(params_two[name], params_one[name], rtol=0, atol=2 * 5e-5 * 2, err_msg=name)
    res_one = json.loads((one / "results.json").read_text())
    res_two = json.loads((two / "results.json").read_text())
    for phase in ("cold_start", "grpo"):
        for key in ("greedy_accuracy", "sampled_accuracy", "greedy_format", "greedy_length"):
            assert res_two[phase][key] == res_one[phase][key], (phase, key)
