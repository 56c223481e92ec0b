"""One GRPO step (experience + update) of tests/rl/test_experience.py's scripted sampler and
task on a tiny random model over 8 CPU devices, as whatever process layout launched it (1
process with 8 devices, or 2 with 4 each; tests/test_multihost.py starts it).

    python -m tests.multihost_grpo_step OUT.npz

The responses have 1 to 6 tokens and the reward is the length / 10, so every advantage is
+-1/sqrt(2) (not 0). The optimizer is plain SGD at lr 1: the update (params after - before)
is minus the gradient itself, not AdamW's ~lr per parameter whatever the gradient.
Process 0 writes OUT.npz: `update/<path>` for every parameter, and `broken/<path>`: the same
step with process 1's copy of the advantages negated (on 1 process: nothing is broken), i.e. a
gradient that is wrong on one process's rows only.
"""

import dataclasses
import sys

from emor3_jax.core import multihost

multihost.initialize()  # before anything touches devices

import jax  # noqa: E402
import numpy as np  # noqa: E402

from emor3_jax.core import sharding  # noqa: E402
from tests.rl.test_experience import _setup  # noqa: E402

B_ROWS = 8  # one micro-batch of all 8 rows: one row per device, 4 on each process


def _update(mesh, learner, params, step, exp) -> dict:
    """{path: params after - before} of one update from `params` (left as they were)."""
    start = jax.tree.map(lambda x: x.copy(), params)  # apply donates its inputs
    before = {jax.tree_util.keystr(p): multihost.to_host(x) for p, x in jax.tree_util.tree_leaves_with_path(start)}
    new, _, _ = step.update(start, learner.init(start), exp, step=1)
    after = {jax.tree_util.keystr(p): multihost.to_host(x) for p, x in jax.tree_util.tree_leaves_with_path(new)}
    return {k: after[k] - before[k] for k in before}


def main(out: str) -> None:
    mesh, learner, params, step, records = _setup(B_ROWS, "token", devices=8)
    ref = jax.tree.map(lambda x: x + 0.01, params)  # differs, so the KL term has a gradient too
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        exp = step.experience(params, ref, records, jax.random.key(0))
        assert np.abs(exp.advantages).min() > 0.5, exp.advantages  # +-1/sqrt(2) on every row
        good = _update(mesh, learner, params, step, exp)
        flip = -1.0 if jax.process_index() == 1 else 1.0
        broken = _update(mesh, learner, params, step, dataclasses.replace(exp, advantages=flip * exp.advantages))
    step.close()
    if multihost.is_main():
        np.savez(out, **{f"update/{k}": v for k, v in good.items()}, **{f"broken/{k}": v for k, v in broken.items()})
        print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
