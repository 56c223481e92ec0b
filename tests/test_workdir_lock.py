"""One run per workdir: a second run stops at once naming the first; a lock left by a killed
run is taken over; the heartbeat keeps a live lock fresh."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from emor3_jax.core.workdir_lock import LOCK_NAME, WorkdirBusy, WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = """
import sys
from emor3_jax.core.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1], heartbeat_s=0.1, stale_after_s=5, on_beat=lambda: print("beat", flush=True)):
    print("locked", flush=True)
    sys.stdin.readline()
    raise SystemExit(3)  # leaving the block by an exception releases the lock too
"""


def _holder(workdir):
    """A real second process holding the lock on `workdir`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = proc.stdout.readline()
    assert line == "locked\n", line + proc.stdout.read()
    return proc


def _write_lock(workdir, host, pid, age_s):
    path = workdir / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age_s, "id": "x"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_second_run_stops_naming_the_first_then_takes_over_after_a_kill(tmp_path, capsys):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirBusy) as err:
            WorkdirLock(str(tmp_path)).acquire()
        msg = str(err.value)
        assert f"host {socket.gethostname()}, pid {proc.pid}, since " in msg and "UTC" in msg
        assert "\n" not in msg and "--config.workdir" in msg
        # The holder's heartbeat moves the file's time forward: read after the beat it reports.
        before = os.stat(tmp_path / LOCK_NAME).st_mtime_ns
        while (line := proc.stdout.readline()) == "beat\n" and os.stat(tmp_path / LOCK_NAME).st_mtime_ns == before:
            pass  # a beat in the same clock tick as `before` leaves the time as it was: wait for the next
        assert line == "beat\n", line + proc.stdout.read()
        assert os.stat(tmp_path / LOCK_NAME).st_mtime_ns > before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Killed: the lock file stays, names a dead pid on this host, and is taken over.
    assert (tmp_path / LOCK_NAME).exists()
    with WorkdirLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["id"] == lock.owner["id"]
    out = capsys.readouterr().out
    assert f"taking over the stale lock of host {socket.gethostname()}, pid {proc.pid}" in out
    assert f"process {proc.pid} is gone" in out
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit


def test_a_run_ending_by_an_exception_releases_the_lock(tmp_path):
    proc = _holder(tmp_path)
    proc.communicate("\n", timeout=60)
    assert proc.returncode == 3 and not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(tmp_path, socket.gethostname(), dead.pid, age_s=1)
    with WorkdirLock(str(tmp_path)):
        pass
    assert f"process {dead.pid} is gone" in capsys.readouterr().out


def test_other_hosts_lock_is_busy_while_its_heartbeat_is_fresh_and_stale_after(tmp_path, capsys):
    _write_lock(tmp_path, "elsewhere", 4242, age_s=5)
    with pytest.raises(WorkdirBusy, match=r"in use by another run: host elsewhere, pid 4242, since .* \(heartbeat 5 s"):
        WorkdirLock(str(tmp_path), heartbeat_s=1, stale_after_s=60).acquire()
    _write_lock(tmp_path, "elsewhere", 4242, age_s=61)
    with WorkdirLock(str(tmp_path), heartbeat_s=1, stale_after_s=60):
        pass
    assert "no heartbeat for 61 s (stale after 60 s)" in capsys.readouterr().out


def test_a_half_written_lock_is_busy_until_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # created by O_EXCL, its owner not yet written
    with pytest.raises(WorkdirBusy, match="unreadable lock file"):
        WorkdirLock(str(tmp_path), heartbeat_s=1, stale_after_s=60).acquire()
    os.utime(tmp_path / LOCK_NAME, (time.time() - 120, time.time() - 120))
    with WorkdirLock(str(tmp_path), heartbeat_s=1, stale_after_s=60):
        pass


def test_a_run_whose_lock_was_taken_over_is_told_at_its_next_check(tmp_path):
    lock = WorkdirLock(str(tmp_path), heartbeat_s=0.05, stale_after_s=5)
    lock.acquire()
    try:
        lock.check()
        _write_lock(tmp_path, "elsewhere", 4242, age_s=0)
        # The heartbeat thread ends at its first beat after the take-over, having noted why.
        lock._thread.join(timeout=60)
        assert not lock._thread.is_alive()
        with pytest.raises(WorkdirBusy, match="was taken over by host elsewhere, pid 4242"):
            lock.check()
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"  # not removed: not ours
