"""Run metrics: JSONL and TensorBoard event files in the workdir, a console progress line.

Only process 0 writes. On resume, JSONL lines written after the restored checkpoint are
dropped, so a restarted run's log reads as if it had never stopped (TensorBoard shows the
replayed steps twice).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax


class CompileTimer:
    """Seconds XLA spent compiling (jax's backend-compile events) since the last `take()`."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self._total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self._total += duration

    def take(self) -> float:
        total, self._total = self._total, 0.0
        return total

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._t0 = {}

    @property
    def lines(self) -> int:
        """JSONL lines written so far (a checkpoint records it to truncate to on resume)."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            return sum(1 for _ in f)

    def truncate_to(self, lines: int) -> None:
        """Keeps the first `lines` lines: what was logged after the restored checkpoint goes."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = f.readlines()[:lines]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, phase: str, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"phase": phase, "step": step, **clean}) + "\n")
        for k, v in clean.items():
            self._tb.add_scalar(f"{phase}/{k}", v, step)
        self._tb.flush()

    def records_skipped(self, counts: dict) -> None:
        """Reports the bad records skipped per split while the data was built ({split: {seen, bad}})."""
        for split, count in counts.items():
            if count:
                print(f"data {split}: skipped {count.get('bad', 0)} bad of {count.get('seen', 0)} records")
                seen, bad = count.get("seen", 0), count.get("bad", 0)
                self.write(f"data_{split}", 0, {"records_seen": seen, "records_bad": bad})

    def text(self, phase: str, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(f"{phase}/{tag}", text, step)
            with open(os.path.join(os.path.dirname(self.path), "samples.txt"), "a") as f:
                f.write(f"=== {phase} step {step} {tag}\n{text}\n")

    def progress(self, phase: str, step: int, total: int, start_step: int, info: str = "") -> None:
        """A one-line progress bar with ETA from the steps done since (re)start."""
        if not self.enabled:
            return
        now = time.perf_counter()
        t0 = self._t0.setdefault(phase, (now, start_step))
        done = step - t0[1]
        eta = (now - t0[0]) / done * (total - step) if done > 0 else float("nan")
        width = 24
        filled = int(width * step / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        eta_s = "?" if eta != eta else f"{int(eta) // 60}m{int(eta) % 60:02d}s"
        sys.stdout.write(f"\r{phase:>10} [{bar}] {step}/{total} eta {eta_s} {info}".ljust(110))
        sys.stdout.flush()
        if step >= total:
            sys.stdout.write("\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
