"""A LoRA model out to Hugging Face: merged into a full checkpoint, or as a PEFT adapter folder.

`save_merged` writes W + A B alpha/rank as the checkpoint's weights (`save_hf` of the same model
without adapters), which transformers loads like any Qwen2.5-VL. `save_peft` writes what PEFT's
`PeftModel.from_pretrained(base, folder)` reads onto the Hugging Face base: `adapter_config.json`
and `adapter_model.safetensors` with PEFT's key names,
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], where <module>
is the projection's name in transformers' Qwen2_5_VLForConditionalGeneration
(`model.language_model.layers.3.self_attn.q_proj`, `model.visual.blocks.0.attn.qkv`,
`model.visual.merger.mlp.0`); ours are lora_a [in, r] and lora_b [r, out], transposed as kernels are.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from etils import epath
from flax import nnx
from safetensors.numpy import save, save_file

from emor3_jax.core import paths
from emor3_jax.core.multihost import to_host
from emor3_jax.models import lora
from emor3_jax.models.qwen25_vl.convert import LINEAR, save_hf, weight_table
from emor3_jax.models.qwen25_vl.model import Qwen25VL, abstract_model

PEFT_PREFIX = "base_model.model."
# A hub checkpoint key's prefix -> the module path transformers' v5 model holds it under.
_MODULE_PREFIXES = (("model.layers.", "model.language_model.layers."), ("visual.", "model.visual."))


def module_name(hub_key: str) -> str:
    """transformers' module path of the projection whose hub weight key is `hub_key`."""
    name = hub_key.removesuffix(".weight")
    for hub, module in _MODULE_PREFIXES:
        if name.startswith(hub):
            return module + name[len(hub) :]
    return name


def _plain(model: Qwen25VL, state) -> Qwen25VL:
    """A model of rank 0 (no adapters) holding `state`'s base parameters (adapters dropped)."""
    defaults = {f.name: f.default for f in dataclasses.fields(model.cfg) if f.name.startswith("lora_")}
    graphdef, _ = nnx.split(abstract_model(dataclasses.replace(model.cfg, **defaults)))
    return nnx.merge(
        graphdef,
        nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if not isinstance(v, lora.LoRAParam)]),
    )


def without_adapters(model: Qwen25VL, dtype: str | None = None) -> Qwen25VL:
    """`model` with its adapters merged into the kernels (lora.merged): a model of rank 0 in
    `dtype` (None: the base's), which `save_hf` writes. The merge is rounded to that dtype once:
    a bf16 base exported in fp32 keeps W + A B s exactly. `model` itself is unchanged."""
    state = nnx.state(model)
    if dtype is not None:
        cast = lambda v: v if isinstance(v, lora.LoRAParam) else v.replace(v.get_value().astype(dtype))
        state = jax.tree.map(cast, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return _plain(model, lora.merged(state))


def base_of(model: Qwen25VL) -> Qwen25VL:
    """`model`'s base: the same parameters with the adapters dropped (rank 0)."""
    return _plain(model, nnx.state(model))


def save_merged(model: Qwen25VL, out_dir: str, **save_hf_kwargs) -> None:
    """A full Hugging Face checkpoint of `model` with its adapters merged (`save_hf`'s arguments;
    the merge rounded to their dtype)."""
    plain = without_adapters(model, save_hf_kwargs.get("dtype")) if model.cfg.lora_rank else model
    save_hf(plain, out_dir, **save_hf_kwargs)


def peft_tensors(model: Qwen25VL) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT's adapter tensors of `model` (fp32, PEFT's key names) and the adapted modules."""
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, lora.LoRAParam))}
    linears = [e for e in weight_table(model.cfg) if e.layout == LINEAR]
    unmapped = {p[:-1] for p in flat} - {e.path[:-1] for e in linears}
    if unmapped:
        raise AssertionError(f"adapters with no hub key (weight table out of sync with the model): {sorted(unmapped)}")
    tensors, modules = {}, []
    for e in linears:
        owner = e.path[:-1]
        if owner + ("lora_a",) not in flat:
            continue
        module = module_name(e.hf_key)
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            v = flat[owner + (ours,)]
            array = to_host(v[...] if e.layer is None else v[e.layer])  # [in, r] / [r, out]
            tensors[f"{PEFT_PREFIX}{module}.{theirs}.weight"] = np.ascontiguousarray(array.T.astype(np.float32))
        modules.append(module)
    return tensors, modules


def adapter_config(model: Qwen25VL, modules: list[str], base: str, dropout: float = 0.0) -> dict:
    """PEFT's LoraConfig for `model`'s adapters on the modules named (full module paths, which
    PEFT matches exactly) over base checkpoint `base`; `dropout`, the run's lora.dropout, is
    recorded as PEFT records its own (it acts in training alone: loaded, the logits are the same)."""
    cfg = model.cfg
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "task_type": None,
        "inference_mode": True,
    }


def save_peft(model: Qwen25VL, out_dir: str, base: str, dropout: float = 0.0) -> None:
    """`model`'s adapters as a PEFT adapter folder over base checkpoint `base` (its path or hub
    id, recorded in adapter_config.json with the run's lora `dropout`). Every process takes part
    (gathers); process 0 writes."""
    if not model.cfg.lora_rank:
        raise ValueError("save_peft: the model has no LoRA adapters (lora.rank=0); export the full checkpoint")
    tensors, modules = peft_tensors(model)
    if jax.process_index() != 0:
        return
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if paths.is_uri(out_dir):
        (out / "adapter_model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
    else:
        save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model, modules, base, dropout), indent=2))
