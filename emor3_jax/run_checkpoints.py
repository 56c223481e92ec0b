"""A run's two checkpoint directories, ckpt/ (every checkpoint.every steps, at each phase's end
and on SIGTERM) and best/ (the best validation), each step saved with the run's metadata: the
phase and step counters and data-iterator states the trainer keeps, the model's
architecture, the run config and the byte sizes of the run's logs (metrics.jsonl,
samples.txt), which a resumed run cuts its logs back to."""

from __future__ import annotations

from collections.abc import Callable

from ml_collections import ConfigDict

from emor3_jax.core import paths
from emor3_jax.core.checkpoint import Checkpointer
from emor3_jax.core.workdir_lock import WorkdirLock

_STORED = ("model", "config", "log_sizes")  # written here, not part of the trainer's meta


class RunCheckpoints:
    def __init__(self, c: ConfigDict, model: dict, lock: WorkdirLock | None = None):
        """`model`: the architecture (models.api.architecture) that every restore is checked against;
        `lock`: the workdir lock this run holds, checked before each save (None: no lock held)."""
        self.ckpt = Checkpointer(paths.join(c.workdir, "ckpt"), c.checkpoint.keep, c.checkpoint.async_save)
        self.best = Checkpointer(paths.join(c.workdir, "best"), 1, c.checkpoint.async_save)
        self.model, self.config, self.lock = model, c.to_json(), lock

    def save(self, meta: dict, state: dict, log_sizes: dict, best: bool = False) -> None:
        """Starts saving `state` (arrays) as step meta["global_step"] of ckpt/ (or best/). Raises
        WorkdirBusy, before writing, when another run took the workdir over."""
        if self.lock is not None:
            self.lock.check()
        target = self.best if best else self.ckpt
        latest = target.latest_step()
        if best and latest is not None and latest >= meta["global_step"]:
            return  # a replayed step after resume: the same state was saved before the interruption
        full = dict(meta, model=self.model, config=self.config, log_sizes=log_sizes)
        target.save(meta["global_step"], state, full)

    def resume(self, abstract_for: Callable[[dict], dict]) -> tuple[dict, dict, dict, str] | None:
        """(the trainer's meta, the arrays, log sizes, the run config it was saved with as JSON) of
        the newest intact ckpt/ step, all from that one step; None if there is none. Damaged newer
        steps are moved aside, one line each; `abstract_for(meta)` is the state's abstract tree."""
        got = self.ckpt.restore_newest_intact(abstract_for, self.model)
        if got is None:
            return None
        for step, why in got.skipped:
            print(f"skipped damaged checkpoint step {step} ({why}); moved it to {got.moved[step]}")
        meta = got.meta
        print(f"resuming from {self.ckpt.directory}/{got.step}: phase {meta['phase']} step {meta['phase_step']}")
        trainer_meta = {k: v for k, v in meta.items() if k not in _STORED}
        return trainer_meta, got.state, meta["log_sizes"], meta["config"]

    def last_step(self) -> int | None:
        """The newest step saved to ckpt/ (or being saved)."""
        return self.ckpt.latest_step()

    def wait(self) -> None:
        self.ckpt.wait()

    def close(self) -> None:
        self.ckpt.close()
        self.best.close()
