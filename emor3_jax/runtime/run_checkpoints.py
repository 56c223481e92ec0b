"""A run's two checkpoint directories, ckpt/ (every checkpoint.every steps, at each phase's end
and on SIGTERM) and best/ (the best validation), each step saved with the run's metadata: the
phase and step counters and data-iterator states the trainer keeps, the model's
architecture, the run config and how many metrics.jsonl lines existed."""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from emor3_jax.runtime.checkpoint import Checkpointer

_STORED = ("model", "config", "metrics_lines")  # written here, not part of the trainer's meta


class RunCheckpoints:
    def __init__(self, c: ConfigDict, model: dict):
        """`model`: the architecture (ModelConfig.to_hf_dict) that every restore is checked against."""
        self.ckpt = Checkpointer(os.path.join(c.workdir, "ckpt"), c.checkpoint.keep, c.checkpoint.async_save)
        self.best = Checkpointer(os.path.join(c.workdir, "best"), 1, c.checkpoint.async_save)
        self.model, self.config = model, c.to_json()

    def save(self, meta: dict, state: dict, metrics_lines: int, best: bool = False) -> None:
        """Starts saving `state` (arrays) as step meta["global_step"] of ckpt/ (or best/)."""
        target = self.best if best else self.ckpt
        latest = target.latest_step()
        if best and latest is not None and latest >= meta["global_step"]:
            return  # a replayed step after resume: the same state was saved before the interruption
        full = dict(meta, model=self.model, config=self.config, metrics_lines=metrics_lines)
        target.save(meta["global_step"], state, full)

    def latest(self) -> tuple[dict, int, str] | None:
        """(the trainer's meta, metrics.jsonl lines, the run config it was saved with as JSON)
        of the latest ckpt/ step; None if none."""
        step = self.ckpt.latest_step()
        if step is None:
            return None
        meta = self.ckpt.read_meta(step)
        print(f"resuming from {self.ckpt.directory}/{step}: phase {meta['phase']} step {meta['phase_step']}")
        return {k: v for k, v in meta.items() if k not in _STORED}, meta["metrics_lines"], meta["config"]

    def restore(self, abstract_state: dict) -> dict:
        """Arrays of the latest ckpt/ step, checked to be of this model."""
        return self.ckpt.restore(self.ckpt.latest_step(), abstract_state, self.model)[0]

    def wait(self) -> None:
        self.ckpt.wait()

    def close(self) -> None:
        self.ckpt.close()
        self.best.close()
