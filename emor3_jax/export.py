"""Writes a saved step of a run as a Hugging Face checkpoint that transformers loads.

    python -m emor3_jax.export --workdir=workdir/tiny --out=/tmp/emor3-hf [--step=N | --best]

--workdir and --out may be URIs (gs://bucket/run, gs://bucket/export).

The architecture and run config come from the checkpoint's metadata; tokenizer, processor
and chat-template files come from the run's HF source checkpoint (or, for the tiny model,
the tokenizer the run built and an image processor config for the run's data.min_pixels and
max_pixels), so `AutoProcessor.from_pretrained(out)` loads.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from etils import epath

from emor3_jax import cli
from emor3_jax.core import paths, sharding
from emor3_jax.load import load_step
from emor3_jax.models.api import save_hf

FLAGS = (
    flags.DEFINE_string("workdir", None, "the training run's workdir"),
    flags.DEFINE_string("out", None, "output directory"),
    flags.DEFINE_integer("step", None, "global step to export (default: the latest)"),
    flags.DEFINE_bool("best", False, "export the best checkpoint (by validation accuracy)"),
    flags.DEFINE_string("dtype", None, "weights dtype (default: the parameters')"),
)


def export(workdir: str, out: str, step: int | None = None, best: bool = False, dtype: str | None = None) -> str:
    directory = paths.join(workdir, "best" if best else "ckpt")
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints (is --workdir a training run's workdir?)")
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
    model, _, config, _ = load_step(directory, step, mesh, sharding.DEFAULT_RULES, compute_dtype="float32")
    like = config["hf_path"] or None
    pixels = (config["data"]["min_pixels"], config["data"]["max_pixels"])
    save_hf(model, out, like=like, dtype=dtype, image_pixels=pixels)
    if like is None and jax.process_index() == 0:
        paths.copy_tree(config["tokenizer_path"] or paths.join(workdir, "tokenizer"), out)
    return out


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    workdir, out, step, best, dtype = (f.value for f in FLAGS)
    if not workdir or not out:
        raise app.UsageError("--workdir and --out are required")
    print(f"wrote {export(workdir, out, step, best, dtype)}")


if __name__ == "__main__":
    cli.run(main)
