"""Run metrics: metrics.jsonl, samples.txt and TensorBoard event files in the workdir, a
console progress line.

Only process 0 writes. On resume, metrics.jsonl and samples.txt are cut back to their sizes at
the restored checkpoint (emptied when none was saved), and TensorBoard's event files are
rebuilt from them, so every step is logged once whenever the run was killed, as if it had
never stopped. (TensorBoard's own files cannot be cut: tensorboardX writes them from a queue.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

import jax

LOGS = ("metrics.jsonl", "samples.txt")  # the logs a checkpoint records the sizes of
_SAMPLE_HEAD = re.compile(r"^=== (\S+) step (\d+) (\S+)$")


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.samples = os.path.join(workdir, "samples.txt")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._tb = self._open_tb()
        self._t0 = {}

    def _open_tb(self):
        from tensorboardX import SummaryWriter

        return SummaryWriter(os.path.join(self.workdir, "tensorboard"))

    def sizes(self) -> dict:
        """Bytes of each of LOGS so far (a checkpoint records them to cut back to on resume)."""
        return {
            name: os.path.getsize(p) if os.path.exists(p := os.path.join(self.workdir, name)) else 0 for name in LOGS
        }

    def rewind(self, sizes: dict) -> None:
        """Cuts each of LOGS back to `sizes` (a checkpoint's; {} for a fresh start: all emptied)
        and rebuilds TensorBoard from what is left: what was logged after the restored
        checkpoint goes everywhere."""
        if not self.enabled:
            return
        for name in LOGS:
            path = os.path.join(self.workdir, name)
            if os.path.exists(path):
                os.truncate(path, sizes.get(name, 0))
        self._tb.close()
        shutil.rmtree(os.path.join(self.workdir, "tensorboard"))
        self._tb = self._open_tb()
        rows = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [json.loads(line) for line in f]
        for row in rows:
            phase, step = row.pop("phase"), row.pop("step")
            for k, v in row.items():
                self._tb.add_scalar(f"{phase}/{k}", v, step)
        for (phase, step, tag), text in _read_samples(self.samples):
            self._tb.add_text(f"{phase}/{tag}", text, step)
        self._tb.flush()

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
            with open(self.samples, "a") as f:
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


def _read_samples(path: str) -> list[tuple[tuple[str, int, str], str]]:
    """((phase, step, tag), text) of each entry `MetricWriter.text` appended to samples.txt."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            head = _SAMPLE_HEAD.match(line.rstrip("\n"))
            if head:
                out.append(((head[1], int(head[2]), head[3]), []))
            elif out:
                out[-1][1].append(line)
    return [(key, "".join(lines)[:-1]) for key, lines in out]  # [:-1]: the newline text() adds
