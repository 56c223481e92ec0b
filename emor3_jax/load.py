"""A policy to evaluate, from a checkpoint path: a training run's Orbax step or a local Hugging
Face Qwen2.5-VL checkpoint; the model on the mesh, its tokenizer and Qwen's special ids.

  workdir            the latest step of workdir/ckpt
  workdir/ckpt/N     step N (also workdir/best/N)
  hf_dir             config.json + *.safetensors (+ tokenizer files)
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath
from flax import nnx
from ml_collections import ConfigDict

from emor3_jax.core import paths, sharding
from emor3_jax.core.checkpoint import Checkpointer
from emor3_jax.factory import check_tokenizer
from emor3_jax.models import lora
from emor3_jax.models.api import PARAM_LAYOUT, Model, ModelConfig, abstract_model, architecture, create_model, load_hf
from emor3_jax.run_checkpoints import base_record, check_base


@dataclasses.dataclass
class Policy:
    model: Model
    cfg: ModelConfig
    tokenizer: object
    special: dict[str, int]  # Qwen special token -> id
    step: int | None  # the Orbax step; None for an HF checkpoint


def load_step(
    directory: str, step: int | None, mesh, rules, scratch: paths.Scratch | None = None, base: str = "", **runtime
) -> tuple[Model, dict, dict, int]:
    """The model saved as `step` (None: the latest) in a run's checkpoint `directory`
    (workdir/ckpt or workdir/best), its parameters placed on `mesh` by `rules`; also the
    step's metadata, the run's config (a dict) and the step.

    The architecture, param_dtype and LoRA adapters are the run's; `runtime` sets ModelConfig's
    other run-time fields (compute_dtype, attention_impl, remat). A LoRA step holds its adapters
    alone: they go onto the run's base, read again from its hf_path (or `base`, a copy of it
    elsewhere; one at a URI through `scratch`) or drawn from its seed, and checked to be the
    base they were trained on.
    """
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints")
    ckpt = Checkpointer(directory, keep=1, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no finished checkpoint")
        meta = ckpt.read_meta(step)
        if meta["model"].get("param_layout") != PARAM_LAYOUT:  # saved with another parameter tree
            raise ValueError(
                f"{directory}/{step}: checkpoint of another model (differs in ['param_layout']: "
                f"{meta['model'].get('param_layout')!r}, this code reads {PARAM_LAYOUT!r}; None: saved before the "
                "layers were stacked); export it with the emor3_jax it was trained with"
            )
        config = json.loads(meta["config"])
        cfg = ModelConfig.from_hf_dict(meta["model"], **_saved_weights(config), **runtime)
        if cfg.lora_rank:
            model = _base(config, cfg, mesh, rules, scratch or paths.Scratch(), base, f"{directory}/{step}")
            check_base(f"{directory}/{step}", meta.get("base"), _record(config, meta, model, base))
            saved = ckpt.restore_subtree(step, {"params": lora.adapters(nnx.state(model))})["params"]
            nnx.update(model, lora.with_adapters(nnx.state(model), saved))
            return model, meta, config, step
        graphdef, abstract = nnx.split(abstract_model(cfg))
        abstract = sharding.abstract_with_shardings(abstract, mesh, rules)
        params = ckpt.restore_subtree(step, {"params": abstract})["params"]
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params), meta, config, step


def _base(config: dict, cfg: ModelConfig, mesh, rules, scratch: paths.Scratch, base: str, where: str) -> Model:
    """A LoRA run's base with fresh adapters: `base` or the run's hf_path read, else its random
    draw (create_model of its seed, the draw its run started from)."""
    path = base or (config["hf_path"] if not config["model"]["init_random"] else "")
    if not path:
        return create_model(cfg, mesh, rules, seed=config["seed"])
    if not epath.Path(path, "config.json").is_file():
        raise FileNotFoundError(
            f"{where}: a LoRA checkpoint holds its adapters alone, and their base {path!r} is not a Hugging Face "
            "checkpoint dir here; pass the base's path (--base)"
        )
    hub = ("text", "vision", "tie_word_embeddings", "image_token_id", "video_token_id")
    hub += ("vision_start_token_id", "vision_end_token_id")
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in hub}
    return load_hf(scratch.local(path, "hf"), mesh, rules, seed=config["seed"], **fields)


def _record(config: dict, meta: dict, model: Model, base: str) -> dict:
    """The base_record of `model`'s base (read from `base` when given)."""
    config = dict(config, hf_path=base or config["hf_path"])
    return base_record(config, architecture(model.cfg), lora.base_fingerprint(nnx.state(model)))


def _saved_weights(config: dict) -> dict:
    """The ModelConfig fields a run's saved config fixes: its weights' dtype and its LoRA
    adapters (a run saved before LoRA existed has no lora section: full fine-tuning)."""
    lo = config.get("lora", {"rank": 0})
    if not lo["rank"]:
        return dict(param_dtype=config["model"]["param_dtype"])
    return dict(
        param_dtype=config["model"]["base_dtype"],
        lora_rank=lo["rank"],
        lora_alpha=float(lo["alpha"]),
        lora_targets=tuple(lo["targets"]),
    )


def locate(path: str) -> tuple[str, int | None]:
    """("hf", None), or (Orbax checkpoint directory, step or None for the latest) for `path`;
    raises naming what was expected when `path` is neither."""
    p = epath.Path(path)  # local or a URI
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint={path!r} does not exist")
    if (p / "config.json").is_file():
        return "hf", None
    if (p / "ckpt").is_dir():
        return paths.join(path, "ckpt"), None
    if p.name.isdigit() and (p / "meta").is_dir():
        return paths.parent(path), int(p.name)
    raise ValueError(
        f"--checkpoint={path!r} is neither a Hugging Face checkpoint dir (config.json + *.safetensors) "
        "nor a training workdir (with ckpt/) nor an Orbax step dir (workdir/ckpt/N or workdir/best/N)"
    )


def load_policy(path: str, c: ConfigDict, mesh, rules, scratch: paths.Scratch | None = None) -> Policy:
    """The policy at `path` on `mesh`, computing in c.model.compute_dtype. The tokenizer is
    c.tokenizer_path if set, else the checkpoint's (HF dir; an Orbax run's tokenizer_path or
    hf_path, or the test tokenizer it built in its workdir). An HF checkpoint or tokenizer at a
    URI is read from its copy in `scratch` (a fresh one, removed when collected, if None)."""
    from transformers import AutoTokenizer

    runtime = dict(
        compute_dtype=c.model.compute_dtype,
        attention_impl=c.model.attention_impl,
        remat=False,
        unroll_layers=c.model.unroll_layers,
        vision_buckets=tuple(c.model.vision_buckets),  # any image size, a bounded number of programs
    )
    scratch = scratch or paths.Scratch()
    where, step = locate(path)
    if where == "hf":
        model = load_hf(scratch.local(path, "hf"), mesh, rules, param_dtype=c.model.param_dtype, **runtime)
        tok_dir = c.tokenizer_path or path
    else:
        model, _, run, step = load_step(where, step, mesh, rules, scratch, **runtime)
        workdir = paths.parent(where)
        tok_dir = c.tokenizer_path or run["tokenizer_path"] or run["hf_path"] or paths.join(workdir, "tokenizer")
    if not epath.Path(tok_dir, "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{tok_dir}: no tokenizer (tokenizer_config.json); set --config.tokenizer_path")
    tok = AutoTokenizer.from_pretrained(scratch.local(tok_dir, "tokenizer", skip=(".safetensors",)))
    special = check_tokenizer(tok, f"{tok_dir} (for {path})", model.cfg)
    return Policy(model, model.cfg, tok, special, step)
