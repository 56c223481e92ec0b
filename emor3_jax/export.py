"""Writes a saved step of a run as a Hugging Face checkpoint that transformers loads.

    python -m emor3_jax.export --workdir=workdir/tiny --out=/tmp/emor3-hf [--step=N | --best]

--workdir and --out may be URIs (gs://bucket/run, gs://bucket/export).

A LoRA run (lora.rank > 0) exports one of two ways:
  --merged   a full checkpoint with the adapters merged into the weights (W + A B alpha/rank)
  --adapter  a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) that
             `peft.PeftModel.from_pretrained(base, out)` loads onto the run's hf_path; a run
             without one (random base weights) also gets its base, adapters off, in out/base

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
from emor3_jax.models.qwen25_vl.lora_export import base_of, save_merged, save_peft

FLAGS = (
    flags.DEFINE_string("workdir", None, "the training run's workdir"),
    flags.DEFINE_string("out", None, "output directory"),
    flags.DEFINE_integer("step", None, "global step to export (default: the latest)"),
    flags.DEFINE_bool("best", False, "export the best checkpoint (by validation accuracy)"),
    flags.DEFINE_string("dtype", None, "weights dtype (default: the parameters')"),
    flags.DEFINE_bool("merged", False, "a LoRA run: a full checkpoint with the adapters merged"),
    flags.DEFINE_bool("adapter", False, "a LoRA run: a PEFT adapter folder over the run's base"),
    flags.DEFINE_string("base", "", "a LoRA run: its base's HF dir when not at the run's hf_path (moved or copied)"),
)


def export(
    workdir: str,
    out: str,
    step: int | None = None,
    best: bool = False,
    dtype: str | None = None,
    merged: bool = False,
    adapter: bool = False,
    base: str = "",
) -> str:
    directory = paths.join(workdir, "best" if best else "ckpt")
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints (is --workdir a training run's workdir?)")
    if merged and adapter:
        raise ValueError("--merged and --adapter: one export per --out; run export twice")
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
    model, _, config, _ = load_step(directory, step, mesh, sharding.DEFAULT_RULES, base=base, compute_dtype="float32")
    rank = model.cfg.lora_rank
    if rank and not (merged or adapter):
        raise ValueError(
            f"{directory}: a LoRA run (lora.rank={rank}); export it with --merged (a full checkpoint, the "
            "adapters merged) or --adapter (a PEFT adapter folder over the run's base)"
        )
    if adapter and not rank:
        raise ValueError(f"{directory}: --adapter needs a LoRA run (lora.rank > 0); this run trained every weight")
    like = base or config["hf_path"] or None
    pixels = (config["data"]["min_pixels"], config["data"]["max_pixels"])
    hf = dict(like=like, dtype=dtype, image_pixels=pixels)
    if adapter:
        base_dir = like
        if base_dir is None:  # random base weights: written beside the adapter, for PEFT to load onto
            base_dir = paths.join(out, "base")
            save_hf(base_of(model), base_dir, **hf)
            _copy_tokenizer(config, workdir, base_dir)
        # a run saved before lora.dropout existed trained without
        save_peft(model, out, base=base_dir, dropout=config["lora"].get("dropout", 0.0))
        return out
    save_merged(model, out, **hf)
    if like is None:
        _copy_tokenizer(config, workdir, out)
    return out


def _copy_tokenizer(config: dict, workdir: str, out: str) -> None:
    """The run's own tokenizer (no HF source checkpoint) into `out`."""
    if jax.process_index() == 0:
        paths.copy_tree(config["tokenizer_path"] or paths.join(workdir, "tokenizer"), out)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    workdir, out, step, best, dtype, merged, adapter, base = (f.value for f in FLAGS)
    if not workdir or not out:
        raise app.UsageError("--workdir and --out are required")
    print(f"wrote {export(workdir, out, step, best, dtype, merged, adapter, base)}")


if __name__ == "__main__":
    cli.run(main)
