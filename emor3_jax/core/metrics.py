"""Run metrics: metrics.jsonl, samples.txt and TensorBoard event files in the workdir, a
console progress line.

Only process 0 writes. On resume, metrics.jsonl and samples.txt are cut back to their sizes at
the restored checkpoint (emptied when none was saved), and TensorBoard's event files are
rebuilt from them, so every step is logged once whenever the run was killed, as if it had
never stopped. (TensorBoard's own files cannot be cut: tensorboardX writes them from a queue.)

The workdir may be a URI (gs://...): every file goes through core/paths, TensorBoard's event
files too (`_EpathEventFile`, registered with tensorboardX for gs:// and s3://).
"""

from __future__ import annotations

import io
import json
import re
import sys
import time

import jax
from etils import epath
from tensorboardX import record_writer

from emor3_jax.core import paths


class _EpathEventFile:
    """A TensorBoard event file at a URI: the bytes written so far, the whole object rewritten
    on each flush (an object cannot be appended to)."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        epath.Path(self.path).write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathEventFiles:
    """tensorboardX's writer factory for URIs (its own for gs:// needs google-cloud-storage's
    client and credentials of its own; this one shares epath's)."""

    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


for _scheme in ("gs", "s3"):
    record_writer.register_writer_factory(_scheme, _EpathEventFiles())


LOGS = ("metrics.jsonl", "samples.txt")  # the logs a checkpoint records the sizes of
_SAMPLE_HEAD = re.compile(r"^=== (\S+) step (\d+) (\S+)$")


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self.path = paths.join(workdir, "metrics.jsonl")
        self.samples = paths.join(workdir, "samples.txt")
        self._tb = None
        if self.enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            self._tb = self._open_tb()
        self._t0 = {}

    def _open_tb(self):
        from tensorboardX import SummaryWriter

        return SummaryWriter(paths.join(self.workdir, "tensorboard"))

    def sizes(self) -> dict:
        """Bytes of each of LOGS so far (a checkpoint records them to cut back to on resume)."""
        return {name: paths.size(paths.join(self.workdir, name)) for name in LOGS}

    def rewind(self, sizes: dict) -> None:
        """Cuts each of LOGS back to `sizes` (a checkpoint's; {} for a fresh start: all emptied)
        and rebuilds TensorBoard from what is left: what was logged after the restored
        checkpoint goes everywhere."""
        if not self.enabled:
            return
        for name in LOGS:
            path = paths.join(self.workdir, name)
            if epath.Path(path).exists():
                paths.truncate(path, sizes.get(name, 0))
        self._tb.close()
        epath.Path(self.workdir, "tensorboard").rmtree(missing_ok=True)
        self._tb = self._open_tb()
        rows = []
        if epath.Path(self.path).exists():
            rows = [json.loads(line) for line in epath.Path(self.path).read_text().splitlines()]
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
        paths.append(self.path, json.dumps({"phase": phase, "step": step, **clean}) + "\n")
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
            paths.append(self.samples, f"=== {phase} step {step} {tag}\n{text}\n")

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
    if not epath.Path(path).exists():
        return []
    out = []
    for line in io.StringIO(epath.Path(path).read_text(encoding="utf-8")):  # lines end at "\n" only
        head = _SAMPLE_HEAD.match(line.rstrip("\n"))
        if head:
            out.append(((head[1], int(head[2]), head[3]), []))
        elif out:
            out[-1][1].append(line)
    return [(key, "".join(lines)[:-1]) for key, lines in out]  # [:-1]: the newline text() adds
