"""Several processes, one run: launch detection, and the tiny trainer on 2 local processes
(4 CPU devices each, localhost coordinator, gloo collectives) against 1 process with the same
8 devices and the same global batches."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import ROOT, _flags, _params

from emor3_jax.core.multihost import initialize, launch_mode

# pytest-xdist (-n 2 --dist loadfile) runs a file's tests on one worker: they share the
# module's 1-process run, built once.

# Both runs take the same flags: responses of at most 32 tokens in one generation bucket, so the
# rollouts and validation decode 32 steps instead of 48 (the reflections already stop at 32), a
# third less of the decode loops that two processes run in lockstep. What is compared (params,
# rewards, validation of 1 vs 2 processes) does not depend on the length.
STEPS = {
    "cold_start.steps": 2,
    "rl.steps": 1,
    "eval.every": 2,
    "rl.max_response_len": 32,
    "sampling.gen_buckets": "(32,)",
}


# What jax's cluster detection and our explicit mode read: cleared so the machine running the
# tests (a SLURM job, a Kubernetes pod) cannot decide a case.
LAUNCH_ENV = re.compile(
    r"^(JAX_(COORDINATOR_ADDRESS|NUM_PROCESSES|PROCESS_ID)"
    r"|SLURM_|OMPI_|TPU_|MEGASCALE_|KUBERNETES_)"
)


@pytest.fixture
def launch_env(monkeypatch):
    """A clean launch environment; `on_tpu_vm(metadata)` makes jax's Cloud TPU detection see a
    TPU VM whose metadata server answers with `metadata` (no real TPU or server here)."""
    from jax._src.clusters import cloud_tpu_cluster

    for key in [k for k in os.environ if LAUNCH_ENV.match(k)]:
        monkeypatch.delenv(key)

    def on_tpu_vm(metadata: dict | None = None):
        monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
        answer = lambda key: (metadata[key], 200) if metadata and key in metadata else ("", 404)
        monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", answer)

    return monkeypatch, on_tpu_vm


def test_launch_mode_explicit_and_single(launch_env):
    env, _ = launch_env
    assert launch_mode() == "single"
    explicit = {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    for k, v in explicit.items():
        env.setenv(k, v)
    assert launch_mode() == "explicit"
    env.delenv("JAX_PROCESS_ID")
    with pytest.raises(ValueError, match=r"\['JAX_PROCESS_ID'\] missing"):
        launch_mode()


def test_launch_mode_follows_jax_cluster_detection(launch_env):
    env, on_tpu_vm = launch_env
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_PROCID="1", SLURM_LOCALID="0")
    for k, v in slurm.items():
        env.setenv(k, v)
    env.setenv("SLURM_NTASKS", "1")
    assert launch_mode() == "single"  # a one-task step: nothing to join
    env.setenv("SLURM_NTASKS", "2")
    assert launch_mode() == "SlurmCluster"
    for k in [*slurm, "SLURM_NTASKS"]:
        env.delenv(k)
    # A GKE TPU slice: its workers in the environment (only on a TPU VM does jax look).
    env.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
    env.setenv("TPU_WORKER_ID", "1")
    assert launch_mode() == "single"  # not on a TPU VM
    on_tpu_vm()
    assert launch_mode() == "GkeTpuCluster"
    env.setenv("TPU_WORKER_HOSTNAMES", "w0")
    assert launch_mode() == "single"  # a one-host slice
    env.setenv("MEGASCALE_NUM_SLICES", "2")
    assert launch_mode() == "GkeTpuCluster"  # two one-host slices: two processes
    env.delenv("MEGASCALE_NUM_SLICES")
    env.delenv("TPU_WORKER_HOSTNAMES")
    # A GCE TPU VM slice: no environment variable at all, the metadata server names the workers.
    on_tpu_vm({"agent-worker-number": "2", "worker-network-endpoints": "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4"})
    assert launch_mode() == "GceTpuCluster"
    on_tpu_vm({"agent-worker-number": "0", "worker-network-endpoints": "10.0.0.1"})
    assert launch_mode() == "single"


def test_initialize_lets_jax_find_the_cluster_and_skips_a_single_process(launch_env):
    env, on_tpu_vm = launch_env
    calls = []
    env.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    env.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
    assert initialize() == "single" and calls == []
    on_tpu_vm({"agent-worker-number": "1", "worker-network-endpoints": "10.0.0.1,10.0.0.2"})
    assert initialize() == "GceTpuCluster"
    assert calls == [("jax_cpu_collectives_implementation", "gloo"), ((), {})]  # no arguments: jax detects


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"  # -O0: conftest.py
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = ROOT
    return env


def _run(args, tmp_path, name: str, processes: int) -> list[str]:
    """`python -m <args>` as 1 process with 8 CPU devices or 2 with 4 each; their outputs."""
    port = _free_port()
    procs = []
    for i in range(processes):
        extra = {}
        if processes > 1:
            extra = dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes))
            extra["JAX_PROCESS_ID"] = str(i)
        log = open(tmp_path / f"{name}_{i}.log", "w+")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", *args],
                    env=_env(8 // processes, **extra),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                ),
                log,
            )
        )
    outs = []
    for i, (p, log) in enumerate(procs):
        p.wait(timeout=600)
        log.seek(0)
        outs.append(log.read())
        assert p.returncode == 0, f"{name} process {i}:\n{outs[-1][-4000:]}"
    return outs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def one(tmp_path_factory):
    """The tiny run as 1 process with 8 devices."""
    tmp_path = tmp_path_factory.mktemp("one")
    _run(["emor3_jax.train", *_flags(tmp_path / "run", **STEPS)], tmp_path, "train_one", 1)
    return tmp_path / "run"


@pytest.mark.slow
def test_two_processes_train_like_one(one, tmp_path):
    """The trainer's orchestration on 2 processes: data split, gathers, checkpoints and
    validation, against 1 process (slow: about 5 minutes on 2 cores; CI's 2-process check is
    the GRPO step below)."""
    two = tmp_path / "two"
    # The two runs one after the other: on 2 cores, side by side they would only slow each other.
    outs = _run(["emor3_jax.train", *_flags(two, **STEPS)], tmp_path, "train_two", 2)
    assert "multi-process (explicit): 2 processes, 8 devices (4 per process)" in outs[0]
    assert "held-out accuracy" in outs[0] and "held-out accuracy" not in outs[1]  # process 0 reports

    # Cold start (step 2): real gradients, the same to float precision.
    _, sft_one = _params(one, 2)
    _, sft_two = _params(two, 2)
    assert sft_one.keys() == sft_two.keys()
    for name in sft_one:
        np.testing.assert_allclose(sft_two[name], sft_one[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # GRPO step 3 samples from those params: the same rollouts and rewards, scored half on each
    # process and gathered. A random model's rewards are all equal, so the advantages are 0 and
    # the GRPO gradient is rounding noise (~1e-6) that Adam scales to +-lr per parameter: the
    # params agree to 2 * lr. (So this cannot catch a wrong GRPO gradient:
    # test_two_processes_take_the_grpo_step_of_one does; this one checks the trainer's
    # orchestration: data split, gathers, checkpoints and validation on 2 processes.)
    metrics = lambda w: [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward_overall", "reward_accuracy", "reward_format", "reward_coherence", "response_length")
    first = lambda rows: [[r[k] for k in keys] for r in rows if r["phase"] == "grpo" and r["step"] == 3]
    assert first(metrics(two)) == first(metrics(one)) and len(first(metrics(one))) == 1
    step_one, params_one = _params(one)
    step_two, params_two = _params(two)
    assert step_one == step_two == 3
    for name in params_one:
        np.testing.assert_allclose(params_two[name], params_one[name], rtol=0, atol=2 * 5e-5, err_msg=name)
    res_one = json.loads((one / "results.json").read_text())
    res_two = json.loads((two / "results.json").read_text())
    for key in ("greedy_accuracy", "sampled_accuracy", "greedy_format", "greedy_length"):
        assert res_two["cold_start"][key] == res_one["cold_start"][key], key  # evaluated after step 2


@pytest.mark.slow
def test_two_processes_evaluate_like_one(one, tmp_path):
    """The evaluation CLI on the 1-process run's checkpoint, as 1 process and as 2 (slow: the
    trainer's validation above already evaluates on 2 processes, in CI)."""
    ev = ["emor3_jax.eval", f"--config={ROOT}/configs/qwen_vl.py", f"--checkpoint={one}", "--samples=2"]
    ev += ["--config.eval.num_examples=4", "--config.eval.batch_size=4", "--config.rl.max_response_len=16"]
    ev += [f"--config.workdir={one}", "--config.data.synthetic_test=8"]
    _run(ev + [f"--out={tmp_path / 'eval_one'}"], tmp_path, "eval_one", 1)
    outs = _run(ev + [f"--out={tmp_path / 'eval_two'}"], tmp_path, "eval_two", 2)
    assert "wrote" in outs[0] and "wrote" not in outs[1]
    ev_one = json.loads((tmp_path / "eval_one" / "results.json").read_text())["datasets"]["test"]
    ev_two = json.loads((tmp_path / "eval_two" / "results.json").read_text())["datasets"]["test"]
    assert ev_two["num_examples"] == ev_one["num_examples"] == 4
    assert ev_two["greedy"] == ev_one["greedy"]  # accuracy, format, length, reflective scores
    assert ev_two["sampled"] == ev_one["sampled"] and ev_two["confusion"] == ev_one["confusion"]
    greedy = lambda d: [json.loads(x)["response"] for x in (d / "test_responses.jsonl").read_text().splitlines()]
    assert greedy(tmp_path / "eval_two") == greedy(tmp_path / "eval_one")


def _same_update(got: dict, want: dict) -> None:
    """Two GRPO updates (params after - before, SGD at lr 1: minus the gradient) agree to float
    rounding: 1e-4 relative plus 2.5e-7 absolute (two float32 ulps of a parameter near 1), far
    below the update's own size (checked > 1e-3 below)."""
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=2.5e-7, err_msg=name)


def test_two_processes_take_the_grpo_step_of_one(tmp_path):
    """One GRPO update with non-zero advantages (tests/multihost_grpo_step.py) as 1 process and
    as 2: the same gradient to float rounding. The 2-process run also takes the step with
    process 1's advantages negated (a gradient wrong on half the rows), and the same comparison
    must refuse it: this is what the check can catch."""
    _run(["tests.multihost_grpo_step", str(tmp_path / "one.npz")], tmp_path, "step_one", 1)
    _run(["tests.multihost_grpo_step", str(tmp_path / "two.npz")], tmp_path, "step_two", 2)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    part = lambda f, kind: {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(kind + "/")}
    want = part(one, "update")
    assert max(float(np.abs(v).max()) for v in want.values()) > 1e-3  # a real step, not rounding noise
    _same_update(part(two, "update"), want)
    # On 1 process nothing was broken; on 2, half the rows pull the other way.
    _same_update(part(one, "broken"), want)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        _same_update(part(two, "broken"), want)
