"""The entry points as a user runs them: an expected error is one `error:` message and exit
status 1, the traceback only with --debug; each case fails before any model is built."""

import json
import os
import signal
import subprocess
import sys

import pytest
from test_workdir_lock import _holder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"--config={ROOT}/configs/qwen_vl.py"


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _one_error(done, message):
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert message in line and line.endswith("(--debug for the traceback)"), line
    return line


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.rl.steps=-5", "error: bad config: --config.rl.steps=-5 must be >= 0 (0: derive from rl.epochs)"),
        ("--config.rl.learning_rate=-0.1", "--config.rl.learning_rate=-0.1 must be > 0"),
        ("--config.eval.num_examples=0", "--config.eval.num_examples=0 must be >= 1"),
        ("--accept_changes=rl.lr", "--accept_changes=rl.lr: no config field ['rl.lr']"),
    ],
)
def test_train_refuses_a_bad_value_in_one_line(tmp_path, flag, message):
    _one_error(_run("-m", "emor3_jax.train", CONFIG, f"--config.workdir={tmp_path}", flag), message)
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize("mode", ["--compile_for=v5p:2x2x1", "--dry_run=8"])
def test_a_bad_shape_is_refused_before_compile_or_dry_run(tmp_path, mode):
    """The shape checks run first: a micro-batch of 0 never reaches the compiler or the fake
    devices (each would fail later, and obscurely); the 3b config needs no data paths here."""
    bad = "--config.rl.micro_batch=0"
    done = _run("-m", "emor3_jax.train", f"{CONFIG}:3b", mode, f"--config.workdir={tmp_path}", bad)
    _one_error(done, "error: bad config: --config.rl.micro_batch=0 must divide update_batch * num_generations")
    assert "devices" not in done.stdout and not os.listdir(tmp_path)  # no table printed, nothing written


def test_debug_shows_the_traceback(tmp_path):
    done = _run("-m", "emor3_jax.train", CONFIG, f"--config.workdir={tmp_path}", "--config.rl.epochs=-2", "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr
    assert "ValueError: bad config: --config.rl.epochs=-2 must be >= 0" in done.stderr


def test_train_into_a_busy_workdir_stops_naming_the_other_run(tmp_path):
    holder = _holder(tmp_path)
    try:
        done = _run("-m", "emor3_jax.train", CONFIG, f"--config.workdir={tmp_path}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    line = _one_error(done, f"{tmp_path} is in use by another run: host ")
    assert f", pid {holder.pid}, since " in line and "--config.workdir" in line
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]  # the other run's files untouched


def test_eval_and_export_name_the_missing_path(tmp_path):
    missing = tmp_path / "nope"
    _one_error(
        _run("-m", "emor3_jax.eval", CONFIG, f"--checkpoint={missing}"), f"--checkpoint='{missing}' does not exist"
    )
    _one_error(
        _run("-m", "emor3_jax.export", f"--workdir={missing}", f"--out={tmp_path / 'hf'}"),
        f"{missing}/ckpt: no checkpoints",
    )


def test_eval_output_defaults_to_the_runs_workdir(tmp_path):
    run = tmp_path / "run"
    (run / "ckpt" / "3" / "meta").mkdir(parents=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    code = (
        "import sys; from emor3_jax.eval import default_out\n"
        "for p in sys.argv[1:]:\n"
        "    try: print(default_out(p))\n"
        "    except ValueError as e: print('ValueError:', e)\n"
    )
    done = _run("-c", code, str(run), str(run / "ckpt" / "3"), str(hf))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        str(run / "eval"),
        str(run / "eval-ckpt-3"),
        f"ValueError: --checkpoint='{hf}' is a Hugging Face checkpoint: pass --out=<directory>",
    ]
