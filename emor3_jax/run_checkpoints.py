"""A run's two checkpoint directories, ckpt/ (every checkpoint.every steps, at each phase's end
and on SIGTERM) and best/ (the best validation), each step saved with the run's metadata: the
phase and step counters and data-iterator states the trainer keeps, the model's
architecture, the run config and the byte sizes of the run's logs (metrics.jsonl,
samples.txt), which a resumed run cuts its logs back to.

A LoRA run (lora.rank > 0) saves its adapters alone, not the frozen base, and records which
base they belong to (`base_record`): its path, a hash of its config and a fingerprint of its
weights; resume and load.py read the base from that path again and refuse another one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from ml_collections import ConfigDict

from emor3_jax.core import paths
from emor3_jax.core.checkpoint import Checkpointer
from emor3_jax.core.workdir_lock import WorkdirLock

_STORED = ("model", "config", "log_sizes", "base")  # written here, not part of the trainer's meta


def base_path(config: dict) -> str:
    """Where a run (its config as a dict) read its base weights: hf_path, or its random draw."""
    if config["hf_path"] and not config["model"]["init_random"]:
        return config["hf_path"]
    return f"random weights (seed {config['seed']}, preset {config['model']['preset']})"


def base_record(config: dict, model: dict, fingerprint: str) -> dict:
    """What a LoRA checkpoint records of its base: `base_path`, the sha256 of its architecture
    (`model`, models.api.architecture) and `fingerprint` (lora.base_fingerprint of its weights)."""
    config_sha = hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()
    return {"path": base_path(config), "config_sha256": config_sha, "weights_sha256": fingerprint}


def check_base(where: str, saved: dict | None, now: dict) -> None:
    """Raises ValueError when the base `now` (a base_record) is not the one the adapters at
    `where` were trained on (`saved`; None: the step predates base records)."""
    if saved is None:
        raise ValueError(
            f"{where}: a LoRA checkpoint without the record of its base (saved before adapters-only "
            "checkpoints); export or resume it with the emor3_jax it was saved with"
        )
    for key, what in (("config_sha256", "config"), ("weights_sha256", "weights")):
        if saved[key] != now[key]:
            raise ValueError(
                f"{where}: its LoRA adapters were trained on the base {saved['path']!r}, whose {what} differ from "
                f"those of {now['path']!r} ({key} {saved[key][:12]}... vs {now[key][:12]}...): point hf_path at "
                "the base it was trained on"
            )


class RunCheckpoints:
    def __init__(self, c: ConfigDict, model: dict, lock: WorkdirLock | None = None, base: dict | None = None):
        """`model`: the architecture (models.api.architecture) that every restore is checked against;
        `lock`: the workdir lock this run holds, checked before each save (None: no lock held);
        `base`: a LoRA run's base_record, saved with each step and checked on resume."""
        self.ckpt = Checkpointer(paths.join(c.workdir, "ckpt"), c.checkpoint.keep, c.checkpoint.async_save)
        self.best = Checkpointer(paths.join(c.workdir, "best"), 1, c.checkpoint.async_save)
        self.model, self.config, self.lock, self.base = model, c.to_json(), lock, base

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
        if self.base is not None:
            full["base"] = self.base
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
        if self.base is not None:
            check_base(f"{self.ckpt.directory}/{got.step}", meta.get("base"), self.base)
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
