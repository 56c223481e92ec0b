"""Writes a saved step of a run as a Hugging Face checkpoint that transformers loads.

    python -m emor3_jax.export --workdir=workdir/tiny --out=/tmp/emor3-hf [--step=N | --best]

The architecture and run config come from the checkpoint's metadata; tokenizer, processor
and chat-template files come from the run's HF source checkpoint (or, for the tiny model,
the tokenizer the run built).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
from absl import app, flags, logging
from flax import nnx

from emor3_jax import sharding
from emor3_jax.checkpoint import Checkpointer
from emor3_jax.models.qwen25_vl.config import ModelConfig
from emor3_jax.models.qwen25_vl.convert import save_hf
from emor3_jax.models.qwen25_vl.model import abstract_model

FLAGS = (
    flags.DEFINE_string("workdir", None, "the training run's workdir"),
    flags.DEFINE_string("out", None, "output directory"),
    flags.DEFINE_integer("step", None, "global step to export (default: the latest)"),
    flags.DEFINE_bool("best", False, "export the best checkpoint (by validation accuracy)"),
    flags.DEFINE_string("dtype", None, "weights dtype (default: the parameters')"),
)


def export(workdir: str, out: str, step: int | None = None, best: bool = False, dtype: str | None = None) -> str:
    directory = os.path.join(workdir, "best" if best else "ckpt")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no checkpoints (is --workdir a training run's workdir?)")
    ckpt = Checkpointer(directory, keep=1, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no finished checkpoint")
        meta = ckpt.read_meta(step)
        config = json.loads(meta["config"])
        cfg = ModelConfig.from_hf_dict(
            meta["model"], param_dtype=config["model"]["param_dtype"], compute_dtype="float32"
        )
        mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
        graphdef, abstract = nnx.split(abstract_model(cfg))
        abstract = sharding.abstract_with_shardings(abstract, mesh, sharding.DEFAULT_RULES)
        params = ckpt.restore_subtree(step, {"params": abstract})["params"]
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, params)
    like = config["hf_path"] or None
    save_hf(model, out, like=like, dtype=dtype)
    if like is None and jax.process_index() == 0:
        tok_dir = config["tokenizer_path"] or os.path.join(workdir, "tokenizer")
        for name in os.listdir(tok_dir):
            shutil.copyfile(os.path.join(tok_dir, name), os.path.join(out, name))
    return out


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    workdir, out, step, best, dtype = (f.value for f in FLAGS)
    if not workdir or not out:
        raise app.UsageError("--workdir and --out are required")
    print(f"wrote {export(workdir, out, step, best, dtype)}")


if __name__ == "__main__":
    app.run(main)
