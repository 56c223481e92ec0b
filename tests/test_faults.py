"""The fault suite: each case is a `python -m emor3_jax.train` command on the tiny config, a
fault, and what the run must do. The short cases run in CI (cold start only, a few steps);
the `slow` ones (not in CI) repeat them in GRPO. SIGTERM in the cold start and in GRPO is
tests/test_train.py's (in-process in CI; through the CLI with SIGKILL in GRPO too, slow); every
out-of-range field, tests/test_config_lib.py::test_out_of_range_value_is_refused_naming_its_flag.

| fault                                   | the run                                                   |
|-----------------------------------------|-----------------------------------------------------------|
| kill -9 before the first checkpoint     | restarts from nothing; logs hold each step once, equal    |
| kill -9 while the last step is written  | resumes from the previous step; params and logs equal     |
|   (cold start; GRPO: slow)              |                                                           |
| a second run into a busy workdir        | exits 1 at start-up naming host and pid; the first ends   |
|                                         |   with the uninterrupted params and logs                  |
| a killed run's lock                     | taken over, naming the dead pid                           |
| damaged latest step (_METADATA deleted, | one line names the step, why, where it went; resumes from |
|   an array file truncated, the metadata |   the previous step; logs equal the uninterrupted run's   |
|   file emptied; the last two: slow)     |                                                           |
| a changed setting on resume             | exits 1 naming the field, old -> new, --accept_changes;   |
|                                         |   nothing written; with the flag it resumes               |
| learning rate 1e6 (cold start, GRPO)    | one line names the step and the flag; nothing diverged    |
|                                         |   is saved                                                |
| cold start on a data set w/o answers    | stops at start-up naming the flag                         |
"""

import ctypes
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from test_metrics import tb_events
from test_train import ROOT, TIMING, _flags, _folder_data, _params

from emor3_jax.core.workdir_lock import LOCK_NAME

# pytest-xdist (-n 2 --dist loadfile) runs a file's tests on one worker: they share the
# module's uninterrupted run, built once.

# One CPU device, as the command runs on a CPU machine: the faults are about checkpoints, locks
# and resuming, which the suite's 8 fake devices only slow down (a third longer per run);
# sharded saving and resuming are test_train.py's (in-process, 8 devices).
ENV = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_backend_optimization_level=0")  # -O0: conftest.py
# Cold start only, a checkpoint at steps 3 and 5: a kill after step 1 is before the first one.
SHORT = {"cold_start.steps": 5, "rl.steps": 0, "rl.epochs": 0, "checkpoint.every": 3, "eval.num_examples": 2}


def _cmd(workdir, *args, **extra):
    return [sys.executable, "-m", "emor3_jax.train", *_flags(workdir, **{**SHORT, **extra}), *args]


def _train(workdir, *args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(workdir, *args, **extra), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def _error(done: subprocess.CompletedProcess) -> str:
    """The one `error:` line a refused run prints (and no traceback)."""
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return line


def _wait(ready, proc, what, timeout=600):
    """Polls for a state that stays once reached (a lock file's pid, a directory): a slow look
    only waits longer. A state that passes (a save under way) is waited on with _kill_when_saving."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)


class _Created:
    """The names created in (or moved into) one directory, as Linux's inotify reports them: the
    kernel queues every event, so a directory that exists for a millisecond is still seen."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, directory):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC)
        wd = libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_CREATE | self.IN_MOVED_TO)
        assert self.fd >= 0 and wd >= 0, f"inotify on {directory}: errno {ctypes.get_errno()}"

    def names(self, timeout: float) -> list[str]:
        """The names reported within `timeout` seconds ([] if none)."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        buf, out = os.read(self.fd, 65536), []
        while buf:  # struct inotify_event: wd, mask, cookie, len, then len bytes of name
            n = struct.unpack_from("iIII", buf)[3]
            out.append(buf[16 : 16 + n].rstrip(b"\0").decode())
            buf = buf[16 + n :]
        return out

    def close(self):
        os.close(self.fd)


def _kill_when_saving(workdir, step, proc, timeout=600):
    """kill -9 `proc` as soon as Orbax starts writing `step` (it creates a temporary directory in
    ckpt/ and renames it to `step` once complete): on the kernel's event, which a fast save
    cannot slip past as it could slip between two looks of a poll."""
    ckpt = os.path.join(workdir, "ckpt")
    _wait(lambda: os.path.isdir(ckpt), proc, "the checkpoint directory")
    created, t0 = _Created(ckpt), time.time()
    try:
        while not any(n.startswith(f"{step}.orbax-checkpoint-tmp") for n in created.names(1.0)):
            assert proc.poll() is None, f"the run ended before a save of step {step}"
            assert time.time() - t0 < timeout, f"no save of step {step} after {timeout} s"
        proc.kill()
    finally:
        created.close()
    proc.wait()


def test_the_event_wait_sees_a_directory_that_exists_for_an_instant(tmp_path):
    created = _Created(tmp_path)
    os.mkdir(tmp_path / "5.orbax-checkpoint-tmp-1")
    os.rename(tmp_path / "5.orbax-checkpoint-tmp-1", tmp_path / "5")  # gone before anyone looks
    assert created.names(1.0) == ["5.orbax-checkpoint-tmp-1", "5"]
    assert created.names(0.01) == []
    created.close()


def _lock_pid(workdir):
    try:
        with open(os.path.join(workdir, LOCK_NAME)) as f:
            return json.load(f)["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _logs(workdir) -> tuple[list[dict], list[tuple]]:
    """metrics.jsonl without timing fields, and TensorBoard's (tag, step) pairs sorted."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)} for line in f]
    return rows, sorted((t, s) for t, s, _ in tb_events(workdir) if not t.endswith(TIMING))


def _steps(workdir) -> list[str]:
    d = os.path.join(workdir, "ckpt")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.fixture(scope="session")
def uninterrupted_dir(tmp_path_factory):
    """The workdir of one uninterrupted run (read only: copy it to change it)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    done = _train(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_dir):
    return _logs(uninterrupted_dir)


def test_kill_before_the_first_checkpoint_restarts_from_nothing(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, t0 = workdir / "metrics.jsonl", time.time()
    while not (metrics.exists() and '"cold_start"' in metrics.read_text()):
        assert proc.poll() is None and time.time() - t0 < 600, "the run ended before logging a step"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert [s for s in _steps(workdir) if s.isdigit()] == [], "killed too late: a checkpoint exists"
    done = _train(workdir)  # the same command resumes: here from nothing
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" not in done.stdout
    assert _logs(workdir) == uninterrupted  # each step once, the same numbers


@pytest.mark.slow  # ~17 s of CI; in-process: test_checkpoint.py::test_the_trainers_state_falls_back_past_a_damaged_step
def test_damaged_latest_step_falls_back_to_the_previous_one(uninterrupted_dir, uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_dir, workdir)
    # The finished run's latest step (5) loses its tree description: the rerun falls back to 3.
    os.remove(workdir / "ckpt" / "5" / "state" / "_METADATA")
    done = _train(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if "skipped damaged checkpoint" in line]
    assert line == (
        f"skipped damaged checkpoint step 5 (state/_METADATA is missing); moved it to {workdir}/ckpt/5.corrupt"
    )
    assert f"resuming from {workdir}/ckpt/3: phase cold_start step 3" in done.stdout
    assert _steps(workdir) == ["3", "5", "5.corrupt"]  # step 5 saved again, the damaged one kept aside
    assert _logs(workdir) == uninterrupted


@pytest.mark.slow
def test_truncated_then_emptied_latest_step_falls_back_to_the_previous_one(uninterrupted_dir, uninterrupted, tmp_path):
    """Two more damages end to end (each is also tests/test_checkpoint.py's, in-process, in CI)."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_dir, workdir)
    # The second half of step 5's array files is lost: TensorStore's OUT_OF_RANGE, in one
    # line. (Every data file: which one holds the arrays read first is Orbax's business.)
    for path in _array_files(workdir / "ckpt" / "5"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    done = _train(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if "skipped damaged checkpoint" in line]
    assert line.startswith("skipped damaged checkpoint step 5 (") and "OUT_OF_RANGE" in line, line
    assert line.endswith(f"moved it to {workdir}/ckpt/5.corrupt")
    assert _logs(workdir) == uninterrupted

    # Then step 5's metadata file is emptied (truncated to 0 bytes).
    (workdir / "ckpt" / "5" / "meta" / "metadata").write_bytes(b"")
    done = _train(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if "skipped damaged checkpoint" in line]
    assert line == (
        "skipped damaged checkpoint step 5 (metadata unreadable (JSONDecodeError: Expecting value: line 1 column 1 "
        f"(char 0))); moved it to {workdir}/ckpt/5.corrupt1"
    )
    assert f"resuming from {workdir}/ckpt/3: phase cold_start step 3" in done.stdout
    assert _steps(workdir) == ["3", "5", "5.corrupt", "5.corrupt1"]
    assert _logs(workdir) == uninterrupted


def test_kill_during_a_save_then_a_second_run_is_refused_while_the_resume_finishes(
    uninterrupted_dir, uninterrupted, tmp_path
):
    workdir = tmp_path / "run"
    # kill -9 while step 5 (the last) is being written asynchronously: step 3 is complete.
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when_saving(workdir, 5, proc)
    assert _steps(workdir)[0] == "3" and "5" not in _steps(workdir), _steps(workdir)  # step 5 half-written
    assert _lock_pid(workdir) == proc.pid  # the killed run's lock is left behind

    # The same command resumes (taking over the dead run's lock); a second run started meanwhile
    # stops at once naming it, and changes nothing.
    out = tmp_path / "resume.out"
    with open(out, "w") as f:
        first = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, text=True)
    _wait(lambda: _lock_pid(workdir) == first.pid, first, "the resumed run locked the workdir")
    second = _train(workdir)
    err = _error(second)
    assert first.poll() is None, "the first run ended before the second was refused: nothing was tested"
    assert err.startswith(f"error: {workdir} is in use by another run: host {socket.gethostname()}, pid {first.pid}, ")
    assert err.endswith("wait for it to end, stop it, or pass another --config.workdir (--debug for the traceback)")
    assert "cold_start [" not in second.stdout  # refused at start-up: nothing trained
    assert first.wait(timeout=900) == 0, out.read_text()[-3000:]
    text = out.read_text()
    assert f"taking over the stale lock of host {socket.gethostname()}, pid {proc.pid}" in text
    assert f"process {proc.pid} is gone" in text
    assert f"resuming from {workdir}/ckpt/3: phase cold_start step 3" in text
    assert not (workdir / LOCK_NAME).exists()
    # Nothing saved was lost, and the result is the uninterrupted run's.
    assert [s for s in _steps(workdir) if s.isdigit()] == ["3", "5"]
    assert _logs(workdir) == uninterrupted
    for step in (3, 5):
        (_, got), (_, ref) = _params(workdir, step), _params(uninterrupted_dir, step)
        assert got.keys() == ref.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"step {step} {k}")


@pytest.mark.slow  # ~30 s of CI; the comparison, its message and --accept_changes: test_config_lib.py
def test_a_changed_setting_on_resume_stops_naming_the_field_until_accepted(uninterrupted_dir, uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_dir, workdir)
    before = (workdir / "metrics.jsonl").read_bytes(), _steps(workdir), (workdir / "results.json").read_bytes()
    err = _error(_train(workdir, **{"rl.learning_rate": 1e-4}))
    assert err == (
        "error: the config differs from the one the checkpoint was saved with: rl.learning_rate: 5e-05 -> 0.0001. "
        "Resume with them anyway: --accept_changes=rl.learning_rate; or start over with a fresh --config.workdir "
        "(--debug for the traceback)"
    )
    after = (workdir / "metrics.jsonl").read_bytes(), _steps(workdir), (workdir / "results.json").read_bytes()
    assert after == before  # refused before anything was written
    done = _train(workdir, "--accept_changes=rl.learning_rate", **{"rl.learning_rate": 1e-4})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rl.learning_rate: 5e-05 -> 0.0001 (accepted by --accept_changes)" in done.stdout
    assert f"resuming from {workdir}/ckpt/5: phase cold_start step 5" in done.stdout
    assert _steps(workdir) == before[1] and _logs(workdir) == uninterrupted


def _array_files(step_dir) -> list[str]:
    """The OCDBT data files of a checkpoint step (its arrays' bytes)."""
    found = [
        os.path.join(root, name)
        for root, _, files in os.walk(step_dir / "state")
        for name in sorted(files)
        if "/d/" in os.path.join(root, name) and os.path.getsize(os.path.join(root, name)) > 64
    ]
    assert found, f"no array data file under {step_dir}"
    return found


def test_diverging_cold_start_stops_naming_the_step_and_flag_and_saves_nothing(tmp_path):
    workdir = tmp_path / "run"
    done = _train(workdir, **{"cold_start.learning_rate": 1e6, "cold_start.warmup_steps": 0, "checkpoint.every": 1})
    assert done.returncode == 1
    (err,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert err.startswith("error: cold_start step 1: the update changed the parameter norm"), err
    assert "no checkpoint was saved; rerun with a lower --config.cold_start.learning_rate (now 1000000.0)" in err
    assert "is kept" not in err and "Traceback" not in done.stderr
    assert [s for s in _steps(workdir) if s.isdigit()] == []


def test_cold_start_on_data_without_answers_stops_at_start_up(tmp_path):
    images, ann = _folder_data(tmp_path / "imgs", corrupt=False)
    rows = [json.loads(line) for line in open(ann)]
    with open(ann, "w") as f:
        f.write("\n".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) for r in rows))
    folder = {"data.source": "folder", "data.train": images, "data.test": images, "data.unfaithful_share": 0.0}
    folder.update({"data.annotations_train": ann, "data.annotations_test": ann, "data.allow_train_test_overlap": True})
    done = _train(tmp_path / "run", **folder)
    assert done.returncode == 1
    assert "8 of 8 training records have no reference answer" in done.stderr
    assert "--config.cold_start.steps=0" in done.stderr and "cold_start [" not in done.stdout


@pytest.mark.slow
def test_diverging_grpo_after_a_cold_start_keeps_the_cold_start_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    flags = {"cold_start.steps": 3, "rl.steps": 3, "rl.learning_rate": 1e6, "checkpoint.every": 1}
    done = _train(workdir, **flags)
    assert done.returncode == 1
    (err,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert err.startswith("error: grpo step 4: "), err
    assert f"the last checkpoint (step 3 in {workdir}/ckpt) is kept" in err
    assert "--config.rl.learning_rate (now 1000000.0) and --accept_changes=rl.learning_rate" in err
    assert [s for s in _steps(workdir) if s.isdigit()] == ["1", "2", "3"]


@pytest.mark.slow
def test_kill_during_a_grpo_save_then_resume_reaches_the_uninterrupted_params(tmp_path):
    grpo = {"cold_start.steps": 3, "rl.steps": 3, "eval.every": 3}  # saves at 3 (cold start end) and 6
    ref = tmp_path / "ref"
    done = _train(ref, **grpo)
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(workdir, **grpo), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _kill_when_saving(workdir, 6, proc)
    assert [s for s in _steps(workdir) if s.isdigit()] == ["3"], _steps(workdir)
    done = _train(workdir, **grpo)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {workdir}/ckpt/3: phase " in done.stdout
    assert [s for s in _steps(workdir) if s.isdigit()] == ["3", "6"]
    assert _logs(workdir) == _logs(ref)
    (_, got), (_, want) = _params(workdir), _params(ref)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
