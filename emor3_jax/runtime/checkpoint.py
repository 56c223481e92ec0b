"""Orbax checkpoints of a run: arrays (params, optimizer state, PRNG) plus JSON metadata
(phase, step, data iterator state, model architecture).

Saves are asynchronous and atomic (Orbax finalises a step directory only when complete), so
a run killed at any moment restarts from the last finished step. Restoring checks the
stored architecture first, so a checkpoint of another model fails with a clear message
instead of a shape error deep inside Orbax.
"""

from __future__ import annotations

import os
import signal
import threading

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Orbax names its cross-process barriers by step: two managers saving the same step
            # (ckpt/ and best/) would share them and fail; a prefix per directory keeps them apart.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=os.path.basename(self.directory.rstrip("/"))
            ),
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Starts saving `state` (a pytree of arrays) and `meta` (JSON) as `step`."""
        self._mngr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def read_meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state, expect_model: dict):
        """(state, meta) of `step`, arrays placed as `abstract_state`'s shardings say."""
        meta = self.read_meta(step)
        if meta.get("model") != expect_model:
            diff = sorted(
                k
                for k in set(expect_model) | set(meta.get("model") or {})
                if (meta.get("model") or {}).get(k) != expect_model.get(k)
            )
            raise ValueError(
                f"{self.directory}/{step}: checkpoint of another model (differs in {diff}); "
                "use a fresh --config.workdir or the matching model config"
            )
        state = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
            "state"
        ]
        return state, meta

    def restore_subtree(self, step: int, abstract_part: dict) -> dict:
        """Only the top-level entries of the state named in `abstract_part` (e.g. {"params": ...})."""
        reader = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"), item_handlers={"state": ocp.PyTreeCheckpointHandler()}
        )
        args = ocp.args.PyTreeRestore(
            abstract_part, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part), partial_restore=True
        )
        try:
            return reader.restore(step, args=ocp.args.Composite(state=args))["state"]
        finally:
            reader.close()

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


class PreemptionFlag:
    """Set by SIGTERM; the training loop saves at the next step boundary and exits."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def restore_handler(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
