"""The model seam: the rest of the code reaches a model family only through this module.

A model is an `nnx.Module` with (letters: B rows, T tokens, S cache slots, D width, V vocab)

    embed(input_ids [B, T], pixels [L, C] | None, layout | None, dropout | None) -> x [B, T, D]
    hidden_states(x, positions [3, B, T], attention_mask [B, T], segment_ids [B, T] | None,
        dropout | None) -> h [B, T, D]
    decode(x, positions, attn, cache, index) -> (h [B, T, D], cache); attn: Segments (q [B, T],
        kv [B, T] ids, causal) for a prefill from entry 0, Live (start / end [B]: each row's live
        cache entries) for a decode step, its token written at entry index [B]
    logits(h [..., D], dropout | None) -> [..., V] fp32

`dropout` (a models.lora.Dropout) is given by the learner's gradient passes alone: the LoRA
dropout of the adapters' inputs (None everywhere else: no dropout).

and the family provides the host-side input preparation (`prepare_inputs`: token ids, pixel
rows and image grids -> positions, vision layout, pixels in the tower's order), the KV-cache
layout (`Cache`, `cache_shapes`, `empty_cache`, `cache_length`, `KV_DTYPES`, `K_CACHE_AXES`,
`V_CACHE_AXES`; paged: `PagedCache`, a pool of `Cache` pages and a page table, which decode
takes in place of a `Cache`, and `write_pages`; `write_slot` copies a prefill row into a slot),
its configuration (`ModelConfig`, named `preset`s), and construction and
checkpoint IO (`create_model`, `abstract_model`, `load_hf`, `save_hf`; `architecture`: what a
run's checkpoints record and restores check, with `PARAM_LAYOUT`). Qwen2.5-VL is the family
implemented; another one plugs in here.
"""

from __future__ import annotations

from typing import Protocol

import jax

from emor3_jax.models.qwen25_vl.config import ModelConfig, preset
from emor3_jax.models.qwen25_vl.convert import load_hf, save_hf
from emor3_jax.models.qwen25_vl.kv_cache import (
    K_CACHE_AXES,
    KV_DTYPES,
    V_CACHE_AXES,
    cache_shapes,
    write_pages,
    write_slot,
)
from emor3_jax.models.qwen25_vl.kv_cache import PagedKVCache as PagedCache
from emor3_jax.models.qwen25_vl.kv_cache import empty as empty_cache
from emor3_jax.models.qwen25_vl.layers import Live, Segments
from emor3_jax.models.qwen25_vl.model import (
    PARAM_LAYOUT,
    Cache,
    abstract_model,
    architecture,
    create_model,
    prepare_inputs,
)
from emor3_jax.models.qwen25_vl.text import cache_length

__all__ = [
    "PARAM_LAYOUT",
    "K_CACHE_AXES",
    "KV_DTYPES",
    "V_CACHE_AXES",
    "Cache",
    "Live",
    "Model",
    "ModelConfig",
    "PagedCache",
    "Segments",
    "abstract_model",
    "architecture",
    "cache_length",
    "cache_shapes",
    "create_model",
    "empty_cache",
    "load_hf",
    "prepare_inputs",
    "preset",
    "save_hf",
    "write_pages",
    "write_slot",
]


class Model(Protocol):
    """What sampling and learning call on a model (see the module docstring for shapes)."""

    cfg: ModelConfig

    def embed(self, input_ids: jax.Array, pixels=None, layout=None, dropout=None) -> jax.Array: ...

    def hidden_states(
        self,
        x: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        segment_ids: jax.Array | None = None,
        dropout=None,
    ) -> jax.Array: ...

    def decode(self, x: jax.Array, positions: jax.Array, attn: Segments | Live, cache: Cache, index) -> tuple: ...

    def logits(self, h: jax.Array, dropout=None) -> jax.Array: ...
