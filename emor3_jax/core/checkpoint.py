"""Orbax checkpoints of a run: arrays (params, optimizer state, PRNG) plus JSON metadata
(phase, step, data iterator state, model architecture).

Saves are asynchronous and atomic (Orbax finalises a step directory only when complete), so
a run killed at any moment restarts from the last finished step. Restoring checks the
stored architecture first, so a checkpoint of another model fails with a clear message
instead of a shape error deep inside Orbax.

A step can still be damaged after it was finalised (a full disk, a copy cut short, a deleted
file). `restore_newest_intact` reads the newest step in full and falls back to older ones,
saying which step it skipped and why in one line; the skipped steps are moved aside (never
deleted) so the resumed run can save those step numbers again.

The directory may be a URI (gs://...): Orbax writes it through epath and TensorStore, and marks
a finished step with a commit file there (object stores have no atomic rename); a damaged step
is moved aside by copying it (core/paths).
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import threading
from collections.abc import Callable

import orbax.checkpoint as ocp
from etils import epath

from emor3_jax.core import multihost, paths

# TensorStore reports damaged bytes as an absl status ("OUT_OF_RANGE: Error reading ...").
_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the step and the cause in one line."""


@dataclasses.dataclass
class Restored:
    step: int
    state: object  # the pytree restored as the abstract state describes it
    meta: dict
    skipped: list[tuple[int, str]]  # newer steps found damaged, newest first: (step, one-line reason)
    moved: dict[int, str]  # where each skipped step's directory was moved aside


def error_line(e: BaseException) -> str:
    """The root cause of `e` in one line. Orbax wraps TensorStore's error (OUT_OF_RANGE on a
    truncated file) in a page of driver specs; the root is what the user can act on.
    StopIteration is skipped: it is only the context a JSON error was raised in."""
    root, seen = e, {id(e)}
    nxt = e.__cause__ or e.__context__
    while nxt is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        if not isinstance(nxt, StopIteration):
            root = nxt
        nxt = nxt.__cause__ or nxt.__context__
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0] if text else ''}"[:300]


def _is_damage(e: BaseException) -> bool:
    """True when `e` says the files are damaged (missing, truncated, unparsable), not that the
    caller asked for another tree or shape (those are bugs that no older step fixes)."""
    c, seen = e, set()
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        if isinstance(c, (OSError, json.JSONDecodeError, UnicodeDecodeError)) or _STATUS.match(str(c)):
            return True
        c = c.__cause__ or c.__context__
    return False


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = paths.absolute(directory).rstrip("/")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Orbax names its cross-process barriers by step: two managers saving the same step
            # (ckpt/ and best/) would share them and fail; a prefix per directory keeps them apart.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=epath.Path(self.directory).name
            ),
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Starts saving `state` (a pytree of arrays) and `meta` (JSON) as `step`."""
        self._mngr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def read_meta(self, step: int) -> dict:
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            if _is_damage(e):
                raise CheckpointError(f"{self._step_dir(step)}: metadata unreadable ({error_line(e)})") from e
            raise

    def _step_dir(self, step: int) -> str:
        return paths.join(self.directory, str(step))

    def _check_model(self, step: int, meta: dict, expect_model: dict) -> None:
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

    def _check_tree(self, step: int, hint: str = "") -> None:
        """Raises CheckpointError when `step`'s description of its array tree is missing or
        unreadable. Without it Orbax still restores into a given tree, but a partial restore
        (export, eval) fails with a pytree structure error."""
        reader = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )
        try:
            tree = reader.item_metadata(step)["state"]
            why = "state/_METADATA is missing" if tree is None else None
        except KeyError:
            why = "state/ is missing"
        except Exception as e:
            if not _is_damage(e):
                raise
            why = f"state/_METADATA unreadable ({error_line(e)})"
        finally:
            reader.close()
        if why:
            raise CheckpointError(f"{self._step_dir(step)}: {why}{hint}")

    def _read_state(self, step: int, abstract_state):
        """The arrays of `step`; CheckpointError (one line) when its files are damaged."""
        self._check_tree(step)
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            return self._mngr.restore(step, args=args)["state"]
        except Exception as e:
            if _is_damage(e):
                raise CheckpointError(f"{self._step_dir(step)}: {error_line(e)}") from e
            raise

    def restore(self, step: int, abstract_state, expect_model: dict):
        """(state, meta) of `step`, arrays placed as `abstract_state`'s shardings say.

        Raises CheckpointError (one line) when the step's files are damaged, ValueError when
        it holds another model."""
        meta = self.read_meta(step)
        self._check_model(step, meta, expect_model)
        return self._read_state(step, abstract_state), meta

    def restore_newest_intact(self, abstract_for: Callable[[dict], object], expect_model: dict) -> Restored | None:
        """The newest step whose files read back in full, or None when there is no step.

        `abstract_for(meta)` gives the abstract state of a step from its metadata (the phase
        decides what was saved). Damaged newer steps are reported in `skipped` and moved
        aside to `<step>.corrupt` (kept for inspection; Orbax refuses to save an existing
        step number, which the resumed run does). Raises CheckpointError listing each step's
        cause when none is intact, ValueError when a step holds another model.
        """
        skipped = []
        for step in reversed(self.all_steps()):
            why = None
            try:
                meta = self.read_meta(step)
                self._check_model(step, meta, expect_model)
                state = self._read_state(step, abstract_for(meta))
            except CheckpointError as e:
                why = str(e).removeprefix(f"{self._step_dir(step)}: ")
            # Each process reads its own shards: a step is intact only when it is on all of them.
            if multihost.any_process(why is not None):
                skipped.append((step, why or "damaged on another process"))
                continue
            moved = self._move_aside([s for s, _ in skipped])
            return Restored(step, state, meta, skipped, moved)
        if not skipped:
            return None
        causes = "; ".join(f"step {s}: {why}" for s, why in skipped)
        raise CheckpointError(
            f"{self.directory}: no intact checkpoint ({causes}); "
            "start over with a fresh --config.workdir (the damaged steps are left as they are)"
        )

    def _move_aside(self, steps: list[int]) -> dict[int, str]:
        """{step: where it went}; process 0 moves, the others see the same names."""
        moved = {}
        if not steps:
            return moved
        for step in steps:
            target, n = f"{self._step_dir(step)}.corrupt", 1
            while epath.Path(target).exists():
                target, n = f"{self._step_dir(step)}.corrupt{n}", n + 1
            moved[step] = target
        if multihost.is_main():
            for step, target in moved.items():
                epath.Path(self._step_dir(step)).rename(target)
        multihost.barrier(f"{self.directory}: damaged steps moved aside")
        self._mngr.reload()
        return moved

    def restore_subtree(self, step: int, abstract_part: dict) -> dict:
        """Only the top-level entries of the state named in `abstract_part` (e.g. {"params": ...}).
        CheckpointError (one line, with the steps on disk) when the step's files are damaged."""
        self._check_tree(step, f"; read another step (on disk: {self.all_steps()})")
        reader = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"), item_handlers={"state": ocp.PyTreeCheckpointHandler()}
        )
        args = ocp.args.PyTreeRestore(
            abstract_part, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part), partial_restore=True
        )
        try:
            return reader.restore(step, args=ocp.args.Composite(state=args))["state"]
        except Exception as e:
            if _is_damage(e):
                raise CheckpointError(
                    f"{self._step_dir(step)}: {error_line(e)}; read another step (on disk: {self.all_steps()})"
                ) from e
            raise
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
