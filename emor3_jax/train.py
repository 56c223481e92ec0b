"""EMO-R3 training: cold start (SFT on SET answers), then GRPO with the reflective reward.

    python -m emor3_jax.train --config=configs/qwen_vl.py              # tiny, CPU
    python -m emor3_jax.train --config=configs/qwen_vl.py:3b --config.hf_path=... --config.workdir=...

The same command resumes: it continues from the last checkpoint in the workdir (after a
crash, SIGKILL or SIGTERM), reaching the same parameters as an uninterrupted run.
--accept_changes names the config fields that may differ from the checkpoint's config
(config_lib.resume_changes). One run at a time holds a workdir (<workdir>/run.lock). The
logic lives in emor3_jax.trainer; this file parses flags and checks them before anything is
built.

    # every program of a step compiled for a TPU slice on this machine's CPU (libtpu), or for
    # a node of 8 H200s (XLA's CUDA compiler): per-chip memory, roofline seconds, and whether
    # it fits (exit 1 if not)
    python -m emor3_jax.train --config=configs/qwen_vl.py:3b --compile_for=v5p:2x2x1
    python -m emor3_jax.train --config=configs/qwen_vl.py:3b --compile_for=h200:8

    # per-device memory of the state on a 64-device target, on this machine's CPU
    python -m emor3_jax.train --config=configs/qwen_vl.py:7b --dry_run=64 \\
        --config.mesh="[('data',1),('fsdp',16),('tensor',4)]"

Both check the config's shapes first (config_lib.validate_shapes): no data paths or weights needed.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from emor3_jax import cli, config_lib
from emor3_jax.core.workdir_lock import WorkdirLock

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/qwen_vl.py[:variant]", lock_config=True)
_DRY_RUN = flags.DEFINE_integer(
    "dry_run", 0, "N > 0: fake N CPU devices (the target's global count), print per-device memory, train nothing"
)
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for",
    "",
    "a TPU topology (e.g. v5p:2x2x1) or N GPUs of a node (h100:8, h200:8): compile every program of a step "
    "for it on this CPU, print per-chip memory and roofline, write <workdir>/compile/<topology>.json, "
    "exit 1 if it does not fit; train nothing",
)
_COMPILE_SLICES = flags.DEFINE_integer("compile_slices", 1, "with --compile_for: slices of that topology (GPUs: nodes)")
_COMPILE_PROGRAMS = flags.DEFINE_list(
    "compile_programs",
    [],
    "with --compile_for: compile only these programs (e.g. gradient,rollout_decode); the others are traced for "
    "their shapes only; an unknown name is an error that lists the config's programs",
)
_ACCEPT_CHANGES = flags.DEFINE_list(
    "accept_changes",
    [],
    "config fields (e.g. rl.learning_rate,rl.b1) that may differ from the checkpoint's config on resume",
)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _COMPILE_PROGRAMS.value and not _COMPILE_FOR.value:
        raise app.UsageError("--compile_programs needs --compile_for")
    c = _CONFIG.value
    if _DRY_RUN.value or _COMPILE_FOR.value:
        config_lib.validate_shapes(c)  # what they build; they read no data and write no checkpoint
    if _DRY_RUN.value:
        from emor3_jax import dry_run

        dry_run.main(c, _DRY_RUN.value)
        return
    if _COMPILE_FOR.value:
        from emor3_jax import compile_for

        only = frozenset(_COMPILE_PROGRAMS.value)
        sys.exit(compile_for.main(c, _COMPILE_FOR.value, _COMPILE_SLICES.value, only))
    config_lib.resolve_hub_ids(c)  # a hub id -> its local snapshot: the start-up's one download
    config_lib.validate(c)  # once per run, before a device or a file is touched
    config_lib.check_accepted(_ACCEPT_CHANGES.value, c)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    from emor3_jax.core import accelerator, multihost

    settings = accelerator.setup(config_lib.compile_cache_dir(c), c.gpu_memory_fraction)  # before a backend starts
    multihost.initialize()  # one process of several (TPU slice, SLURM, explicit env): join them first
    with WorkdirLock(c.workdir) as lock:
        if multihost.is_main():  # starts the backend: only once the workdir is ours
            print(settings, flush=True)
        from emor3_jax.trainer import Run, run_phases  # slow to import: only once the workdir is ours

        run_phases(Run(c, tuple(_ACCEPT_CHANGES.value), lock))  # c resolved and validated above


if __name__ == "__main__":
    cli.run(main)
