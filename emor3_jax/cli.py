"""What the entry points (train, eval, export) share: errors a user can act on print as one
`error:` message and exit 1; the traceback only with --debug.

    if __name__ == "__main__":
        cli.run(main)
"""

from __future__ import annotations

import sys

from absl import app, flags

from emor3_jax.core.checkpoint import CheckpointError
from emor3_jax.core.workdir_lock import WorkdirBusy

_DEBUG = flags.DEFINE_bool("debug", False, "on an error, print the full traceback instead of one message")

# Errors whose message says what is wrong and what to do: bad values and paths, missing or
# damaged files, a diverged run, a busy workdir. Anything else is a bug and keeps its traceback.
EXPECTED = (ValueError, OSError, FloatingPointError, CheckpointError, WorkdirBusy)


def run(main) -> None:
    """absl's app.run(main), printing EXPECTED errors as `error: <message>` (exit status 1)."""

    def guarded(argv):
        try:
            return main(argv)
        except EXPECTED as e:
            if _DEBUG.value:
                raise
            print(f"error: {e} (--debug for the traceback)", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(guarded)
