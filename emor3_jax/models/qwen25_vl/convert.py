"""Hugging Face safetensors <-> our parameters, through one weight table.

`weight_table(cfg)` lists every hub key (`model.layers.*`, `visual.*`, `lm_head.*`) with our
parameter path and how the tensor is laid out; loading and export both read it. The hub's
per-layer keys (`model.layers.{i}.…`, `visual.blocks.{i}.…`) are slices `layer` = i of our
stacked parameters [Y, ...]. Tensors are read shard by shard (`safe_open(...).get_slice`)
straight into their device shardings, so no host ever holds the full model. Safetensors
only: nothing is unpickled, nothing downloaded.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from contextlib import ExitStack

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save, save_file

from emor3_jax.core import paths, sharding
from emor3_jax.core.multihost import to_host
from emor3_jax.models import lora
from emor3_jax.models.qwen25_vl.config import ModelConfig
from emor3_jax.models.qwen25_vl.model import Qwen25VL, abstract_model, init_params

log = logging.getLogger(__name__)

# Layouts: "copy" same array; "linear" HF [out, in] <-> ours [in, out];
# "conv" HF Conv3d [E, C, T, P, P] <-> ours [C*T*P*P, E].
COPY, LINEAR, CONV = "copy", "linear", "conv"

# Non-weight files of a checkpoint directory that export carries over.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One hub tensor: our parameter at `path`, or its slice `layer` of a stacked parameter."""

    hf_key: str
    path: tuple
    layout: str
    layer: int | None = None

    def shape(self, var) -> tuple[int, ...]:
        """Our-layout shape of this entry's tensor in parameter `var`."""
        return tuple(var.shape[1:] if self.layer is not None else var.shape)


def weight_table(cfg: ModelConfig) -> list[Entry]:
    """Every hub key of a Qwen2.5-VL checkpoint with our parameter path and layout."""
    table = [Entry("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), CONV)]

    def linear(hf: str, ours: tuple, bias: bool, layer: int | None = None):
        table.append(Entry(f"{hf}.weight", (*ours, "kernel"), LINEAR, layer))
        if bias:
            table.append(Entry(f"{hf}.bias", (*ours, "bias"), COPY, layer))

    for i in range(cfg.vision.depth):
        hf, ours = f"visual.blocks.{i}", ("visual", "blocks")
        table += [
            Entry(f"{hf}.norm1.weight", (*ours, "norm1", "weight"), COPY, i),
            Entry(f"{hf}.norm2.weight", (*ours, "norm2", "weight"), COPY, i),
        ]
        linear(f"{hf}.attn.qkv", (*ours, "attn", "qkv"), True, i)
        linear(f"{hf}.attn.proj", (*ours, "attn", "proj"), True, i)
        for p in ("gate_proj", "up_proj", "down_proj"):
            linear(f"{hf}.mlp.{p}", (*ours, "mlp", p), True, i)
    table.append(Entry("visual.merger.ln_q.weight", ("visual", "merger", "ln_q", "weight"), COPY))
    linear("visual.merger.mlp.0", ("visual", "merger", "fc1"), True)
    linear("visual.merger.mlp.2", ("visual", "merger", "fc2"), True)

    table.append(Entry("model.embed_tokens.weight", ("embed_tokens",), COPY))
    for i in range(cfg.text.num_layers):
        hf, ours = f"model.layers.{i}", ("layers",)
        for p in ("q_proj", "k_proj", "v_proj"):
            linear(f"{hf}.self_attn.{p}", (*ours, "self_attn", p), True, i)
        linear(f"{hf}.self_attn.o_proj", (*ours, "self_attn", "o_proj"), False, i)
        for p in ("gate_proj", "up_proj", "down_proj"):
            linear(f"{hf}.mlp.{p}", (*ours, "mlp", p), False, i)
        table += [
            Entry(f"{hf}.input_layernorm.weight", (*ours, "input_layernorm", "weight"), COPY, i),
            Entry(f"{hf}.post_attention_layernorm.weight", (*ours, "post_attention_layernorm", "weight"), COPY, i),
        ]
    table.append(Entry("model.norm.weight", ("norm", "weight"), COPY))
    if not cfg.tie_word_embeddings:
        linear("lm_head", ("lm_head",), False)
    return table


def hf_shape(layout: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of the hub tensor behind one of our parameters."""
    if layout == LINEAR:
        return shape[::-1]
    if layout == CONV:
        v = cfg.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tuple(shape)


def _read(tensor_slice, layout: str, index: tuple[slice, ...]) -> np.ndarray:
    """Our-layout block `index` of one hub tensor, reading only the rows it needs."""
    if layout == LINEAR:
        return tensor_slice[index[1], index[0]].T
    if layout == CONV:
        rows = tensor_slice[index[1]]
        return rows.reshape(rows.shape[0], -1).T[index[0]]
    return tensor_slice[index]


def _to_hf(array: np.ndarray, layout: str, cfg: ModelConfig) -> np.ndarray:
    if layout == LINEAR:
        return np.ascontiguousarray(array.T)
    if layout == CONV:
        return np.ascontiguousarray(array.T).reshape(hf_shape(CONV, array.shape, cfg))
    return array


def _check_table(cfg: ModelConfig, abs_state) -> dict[tuple, nnx.Variable]:
    """The model's hub-mapped parameters by path (all but LoRA adapters, which no hub checkpoint has)."""
    flat = {tuple(p): v for p, v in nnx.to_flat_state(abs_state) if not isinstance(v, lora.LoRAParam)}
    table_paths = {e.path for e in weight_table(cfg)}
    if table_paths != set(flat):
        raise AssertionError(f"weight table out of sync with the model: {sorted(table_paths ^ set(flat))[:5]}")
    return flat


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, n) for n in names]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{path}: shard files listed in the index are missing: {missing}")
    if not files:
        pickled = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt*"))
        hint = " (only pickled weights found; convert them to safetensors first)" if pickled else ""
        raise FileNotFoundError(f"{path}: no *.safetensors weight files{hint}")
    return files


def load_hf(path: str, mesh: Mesh, rules, seed: int = 0, **runtime) -> Qwen25VL:
    """Loads a local HF Qwen2.5-VL checkpoint directly into its shardings on `mesh` (safetensors
    are memory-mapped: a checkpoint at a URI is read from its copy, paths.Scratch.local).

    `runtime` sets ModelConfig's run-time fields (param_dtype, compute_dtype, attention_impl,
    lora_*). LoRA adapters are drawn from `seed` as create_model draws them (B zeros: the
    loaded model's outputs). Raises, naming them, on unmapped keys, missing keys and shape
    mismatches.
    """
    cfg = ModelConfig.from_hf_dir(path, **runtime)
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    flat = _check_table(cfg, abs_state)
    table = weight_table(cfg)
    with ExitStack() as stack:
        where = {}
        for f in _weight_files(path):
            handle = stack.enter_context(safe_open(f, framework="numpy"))
            for key in handle.keys():
                where[key] = (handle, f)
        wanted = {e.hf_key for e in table}
        # A tied checkpoint may still carry lm_head.weight (it equals the embedding): not needed.
        ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        unmapped = sorted(set(where) - wanted - ignorable)
        missing = sorted(wanted - set(where))
        if unmapped or missing:
            raise ValueError(
                f"{path}: checkpoint keys do not match Qwen2.5-VL "
                f"(depth {cfg.vision.depth}, {cfg.text.num_layers} layers): "
                f"unmapped keys {unmapped[:10]}{'...' if len(unmapped) > 10 else ''}, "
                f"missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}"
            )
        dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
        by_path: dict[tuple, list[Entry]] = {}
        for e in table:  # a stacked parameter's entries in layer order
            by_path.setdefault(e.path, []).append(e)
        leaves = []
        for p, entries in by_path.items():
            target = sharding.named_sharding(flat[p].get_metadata()["axes"], flat[p].shape, mesh, rules)
            leaves.append((p, flat[p].replace(_load_param(entries, flat[p], where, target, dtype, cfg))))
    leaves += init_params(nnx.to_flat_state(abs_state), mesh, rules, seed, only=lora.LoRAParam)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _load_param(entries: list[Entry], var, where: dict, target, dtype, cfg: ModelConfig) -> jax.Array:
    """Parameter `var` from its hub tensors (one, or one per layer of a stacked parameter),
    each device's block read from the files straight into sharding `target`."""
    tensors = []
    for e in entries:
        handle, fname = where[e.hf_key]
        tslice = handle.get_slice(e.hf_key)
        expected = hf_shape(e.layout, e.shape(var), cfg)
        if tuple(tslice.get_shape()) != expected:
            raise ValueError(f"{fname}: {e.hf_key} has shape {tuple(tslice.get_shape())}, expected {expected}")
        tensors.append(tslice)
    layout = entries[0].layout
    if entries[0].layer is None:
        return jax.make_array_from_callback(var.shape, target, lambda idx: _read(tensors[0], layout, idx).astype(dtype))

    def stacked(idx):  # idx[0]: the block's layers
        layers = range(*idx[0].indices(len(tensors)))
        return np.stack([_read(tensors[i], layout, idx[1:]).astype(dtype) for i in layers])

    return jax.make_array_from_callback(var.shape, target, stacked)


def processor_config(cfg: ModelConfig, min_pixels: int, max_pixels: int) -> dict:
    """preprocessor_config.json of the image processor a run resized its images with (Qwen's
    smart_resize between min_pixels and max_pixels, CLIP mean/std, `cfg`'s patch sizes), in
    the field names of transformers' Qwen2VLImageProcessor; AutoProcessor reads it."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    v = cfg.vision
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "min_pixels": min_pixels,  # the hub files' names, read by transformers 4.x
        "max_pixels": max_pixels,
        "resample": int(PILImageResampling.BICUBIC),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size,
    }


def save_hf(
    model: Qwen25VL,
    out_dir: str,
    like: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    image_pixels: tuple[int, int] | None = None,
) -> None:
    """Writes `model` as a HF checkpoint: sharded safetensors with hub key names, config.json,
    and (from `like`, a source checkpoint dir) its tokenizer/processor/chat-template files.
    `image_pixels` = (min_pixels, max_pixels) the run resized images to: a
    preprocessor_config.json for them is written when `like` brings none. `out_dir` and `like`
    may be URIs (gs://...).

    Every process takes part (gathers); only process 0 writes.
    """
    cfg = model.cfg
    if cfg.lora_rank:  # its adapters have no key in the hub's table
        raise ValueError("save_hf writes a model without LoRA adapters; merge them first (lora.merged)")
    out_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    table = weight_table(cfg)
    if {e.path for e in table} != set(flat):
        raise AssertionError("weight table out of sync with the model")
    config = cfg.to_hf_dict()
    if like is not None:
        config = _config_like(like, cfg)
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = out_dtype.name

    # Plan shards from shapes first so file names can say "-of-N".
    shards, size = [[]], 0
    for e in table:
        nbytes = int(np.prod(e.shape(flat[e.path]))) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    writer = jax.process_index() == 0
    out = epath.Path(out_dir)  # local or a URI
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, entries in zip(names, shards):
        tensors = {}
        for e in entries:
            ours = flat[e.path][...] if e.layer is None else flat[e.path][e.layer]  # a layer: its slice alone
            arr = _to_hf(to_host(ours), e.layout, cfg).astype(out_dtype)
            tensors[e.hf_key] = arr
            weight_map[e.hf_key] = name
            total += arr.nbytes
        if writer and paths.is_uri(out_dir):  # objects are written whole: the shard's bytes in memory
            (out / name).write_bytes(save(tensors, metadata={"format": "pt"}))
        elif writer:
            save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
    if not writer:
        return
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if like is not None:
        for name in AUX_FILES:
            src = epath.Path(like, name)
            if src.is_file():
                src.copy(out / name, overwrite=True)
    processor = out / "preprocessor_config.json"
    if image_pixels is not None and not processor.is_file():
        processor.write_text(json.dumps(processor_config(cfg, *image_pixels), indent=2))


def _config_like(like: str, cfg: ModelConfig) -> dict:
    """The source checkpoint's config.json, after checking it describes the same architecture."""
    src = json.loads(epath.Path(like, "config.json").read_text())
    src_cfg = ModelConfig.from_hf_dict(
        src, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, attention_impl=cfg.attention_impl
    )
    if src_cfg != cfg:
        raise ValueError(f"{like}/config.json describes another architecture than the model being exported")
    return src
