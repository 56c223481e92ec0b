"""One run per workdir: a lock file naming its owner, so a second run stops at once.

    with WorkdirLock(workdir):   # raises WorkdirBusy naming the other run's host, pid and start
        train()

`<workdir>/run.lock` is created exclusively (paths.create_exclusive: O_EXCL on local disks and
NFS, a create-if-absent precondition on GCS) and holds the owner's host, pid, start time and a
random id. A thread touches it every `heartbeat_s`
while the run lives; leaving the `with` block removes it. A lock left by a killed run is stale
when its process is gone (same host) or its heartbeat is older than `stale_after_s` (any
host: another host's pids cannot be checked); it is taken over with a message.

Only process 0 of a multi-process run holds the lock; every process learns whether it got it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from etils import epath

from emor3_jax.core import multihost, paths

LOCK_NAME = "run.lock"


@dataclasses.dataclass(frozen=True)
class Version:
    """What identifies one lock file: its modification time and its bytes."""

    mtime: float
    data: bytes


class WorkdirBusy(RuntimeError):
    """Another run holds the workdir (or took it over from this one)."""


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class WorkdirLock:
    def __init__(
        self,
        workdir: str,
        heartbeat_s: float = 30.0,
        stale_after_s: float = 600.0,
        on_beat: Callable[[], None] | None = None,
    ):
        """`on_beat`: called by the heartbeat thread after each touch of the lock file (tests wait
        on it instead of sleeping)."""
        if stale_after_s <= 2 * heartbeat_s:
            raise ValueError(f"stale_after_s={stale_after_s} must exceed two heartbeats ({2 * heartbeat_s} s)")
        self.path = paths.join(workdir, LOCK_NAME)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "id": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread = None
        self._lost = None  # set by the heartbeat when the file no longer names this run: why
        self._on_beat = on_beat

    # ---- the lock file
    def _read(self) -> tuple[dict | None, Version]:
        """(owner, version) of the current lock file; owner None when it is not (yet) readable
        JSON (another run may be between creating and writing it). FileNotFoundError when absent."""
        p = epath.Path(self.path)
        mtime, data = paths.mtime(self.path), p.read_bytes()
        try:
            return json.loads(data.decode("utf-8")), Version(mtime, data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, Version(mtime, data)

    def _create(self) -> bool:
        return paths.create_exclusive(self.path, json.dumps(self.owner).encode("utf-8"))

    def _stale_reason(self, other: dict | None, st: Version) -> str | None:
        age = time.time() - st.mtime
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_after_s:.0f} s)"
        if other and other.get("host") == self.owner["host"] and not _pid_alive(int(other.get("pid", -1))):
            return f"process {other.get('pid')} is gone"
        return None

    @staticmethod
    def describe(other: dict | None, st: Version) -> str:
        if other is None:
            return f"an unreadable lock file (being written?), last touched {_when(st.mtime)}"
        beat = time.time() - st.mtime
        return (
            f"host {other.get('host')}, pid {other.get('pid')}, since {_when(other.get('started', 0))} "
            f"(heartbeat {beat:.0f} s ago)"
        )

    def _take_over(self, st: Version) -> None:
        """Removes the stale file judged by `st`. It is moved aside first: when two runs take
        over at once, the slower one may move the faster one's new lock, sees that it is not
        the file it judged, and puts it back (unless a third run holds the lock by then; the
        moved run's heartbeat notices)."""
        aside = epath.Path(f"{self.path}.stale-{self.owner['id']}")
        try:
            epath.Path(self.path).rename(aside)
        except FileNotFoundError:
            return  # already gone
        moved = Version(paths.mtime(aside), aside.read_bytes())
        if moved != st:
            paths.create_exclusive(self.path, moved.data)
        aside.unlink()

    def _try_acquire(self) -> str | None:
        """None when this run now holds the lock, else why not (one line)."""
        for _ in range(3):  # a takeover may race with another run's; retry a few times
            if self._create():
                return None
            try:
                other, st = self._read()
            except FileNotFoundError:
                continue  # released between our create and read
            if other is not None and other.get("id") == self.owner["id"]:
                return None
            why = self._stale_reason(other, st)
            if why is None:
                return (
                    f"{paths.parent(self.path)} is in use by another run: {self.describe(other, st)}; "
                    "wait for it to end, stop it, or pass another --config.workdir"
                )
            print(f"{self.path}: taking over the stale lock of {self.describe(other, st)}: {why}", flush=True)
            self._take_over(st)
        return f"{self.path}: could not take the lock (other runs keep taking it); retry"

    # ---- heartbeat
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                other, st = self._read()
            except FileNotFoundError:
                self._lost = "was removed"
                return
            if other is None or other.get("id") != self.owner["id"]:
                self._lost = f"was taken over by {self.describe(other, st)}"
                return
            paths.touch(self.path)
            if self._on_beat is not None:
                self._on_beat()

    def check(self) -> None:
        """Raises WorkdirBusy when the lock file no longer names this run (it was removed, or a
        run that judged this one stale took it over); call it before each save."""
        if self._lost:
            raise WorkdirBusy(f"{self.path} {self._lost} while this run held it; stop one of the two runs")

    # ---- acquire / release
    def acquire(self) -> None:
        """Takes the lock or raises WorkdirBusy naming the run that holds it."""
        why = None
        if multihost.is_main():
            epath.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            why = self._try_acquire()
        if multihost.any_process(why is not None):
            raise WorkdirBusy(why or "process 0 could not lock the workdir (its log says why)")
        if multihost.is_main():
            self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
            self._thread.start()

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            other, _ = self._read()
        except FileNotFoundError:
            return
        if other is not None and other.get("id") == self.owner["id"]:  # never remove another run's lock
            epath.Path(self.path).unlink()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
