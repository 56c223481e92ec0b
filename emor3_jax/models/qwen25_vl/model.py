"""Qwen2.5-VL: vision tower + token embedding + M-RoPE decoder + LM head.

Letters: B batch, T tokens, D width, V vocab, L patches, C patch row, M merged tokens.

Host side, `prepare_inputs` turns token ids, the processor's pixel rows and grids into what
the jitted forward needs (position ids, window layout, pixels in window order, padded to a
`vision_buckets` bucket). Device side,
`Qwen25VL.__call__` embeds tokens, writes image/video features at their pad tokens, and
runs the decoder.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from emor3_jax.core import sharding
from emor3_jax.models import lora
from emor3_jax.models.qwen25_vl import layers, stack
from emor3_jax.models.qwen25_vl.config import ModelConfig
from emor3_jax.models.qwen25_vl.kv_cache import KVCache
from emor3_jax.models.qwen25_vl.rope import get_rope_index, mrope_cos_sin
from emor3_jax.models.qwen25_vl.text import DecoderLayer
from emor3_jax.models.qwen25_vl.vision import VisionLayout, VisionTower, order_pixels, vision_layout

Cache = KVCache  # every layer's keys and values [Y, B, S, K, H] (kv_cache.py)

# The parameter tree's layout, recorded with the architecture in every Orbax checkpoint: a
# checkpoint of the earlier layout (one module per layer: `layers/0/...`) is then refused as
# another model before Orbax is asked to restore a tree it does not have.
PARAM_LAYOUT = "stacked_layers"
# The numbers a forward pass's lora.Dropout is folded with for each part of the model.
_VISION, _TEXT, _HEAD = 0, 1, 2


def architecture(cfg: ModelConfig) -> dict:
    """What a run's checkpoints record of the model and every restore checks: the HF config
    dict and PARAM_LAYOUT."""
    return dict(cfg.to_hf_dict(), param_layout=PARAM_LAYOUT)


class Qwen25VL(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        t = cfg.text
        pd, cd = layers.dtype_of(cfg.param_dtype), layers.dtype_of(cfg.compute_dtype)
        kw = dict(param_dtype=pd, compute_dtype=cd, rngs=rngs)
        self.visual = VisionTower(
            cfg.vision,
            cfg.attention_impl,
            remat=cfg.layer_remat,
            unroll=cfg.unroll_layers,
            adapters=(cfg.adapter("vision"), cfg.adapter("merger")),
            **kw,
        )
        self.embed_tokens = layers.param(rngs, "normal", (t.vocab_size, t.hidden_size), ("vocab", "embed"), pd)
        text_adapters = (cfg.adapter("attention"), cfg.adapter("mlp"))
        make = lambda r: DecoderLayer(
            t, cfg.attention_impl, param_dtype=pd, compute_dtype=cd, rngs=r, adapters=text_adapters
        )
        self.layers = stack.stacked(make, t.num_layers, rngs)  # one module, parameters [Y, ...]
        self.norm = layers.RMSNorm(t.hidden_size, t.rms_norm_eps, "norm", param_dtype=pd, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else layers.Linear(
                t.hidden_size, t.vocab_size, ("embed", "vocab"), bias=False, adapter=cfg.adapter("lm_head"), **kw
            )
        )
        self.compute_dtype = cd

    def embed(
        self,
        input_ids: jax.Array,
        pixels: jax.Array | None = None,
        layout: VisionLayout | None = None,
        dropout: lora.Dropout | None = None,
    ) -> jax.Array:
        """Token embeddings [B, T, D], image/video features written at their pad tokens.
        `dropout` (training passes only): the LoRA dropout of the vision tower's adapters."""
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.compute_dtype)
        if pixels is None:
            return x
        # [M, D], window order
        merged = self.visual(pixels.astype(self.compute_dtype), layout, dropout=lora.fold(dropout, _VISION))
        merged = merged.astype(x.dtype)
        for token_id, order in (
            (self.cfg.image_token_id, layout.merged_image),
            (self.cfg.video_token_id, layout.merged_video),
        ):
            if order.shape[0]:
                x = _scatter_features(x, input_ids == token_id, merged[order])
        return x

    def hidden_states(
        self,
        x: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        segment_ids: jax.Array | None = None,
        dropout: lora.Dropout | None = None,
    ) -> jax.Array:
        """Decoder over embeddings x [B, T, D] -> final-normed hidden states [B, T, D].

        A token attends causally to the tokens attention_mask [B, T] marks; with segment_ids
        [B, T] (packed rows, ids >= 1) only to those of its own segment. Both become one
        `layers.Segments` (0 where attention_mask is 0), which every attention impl takes.
        `dropout` (training passes only): the LoRA dropout of the decoder's adapters.
        """
        real = attention_mask.astype(bool)
        ids = real.astype(jnp.int32) if segment_ids is None else jnp.where(real, segment_ids, 0).astype(jnp.int32)
        segments = layers.Segments(ids, ids, causal=True)
        return self.decode(x, positions, segments, dropout=lora.fold(dropout, _TEXT))[0]

    def decode(
        self,
        x: jax.Array,
        positions: jax.Array,
        attn,
        cache: Cache | None = None,
        index: jax.Array | int = 0,
        dropout: lora.Dropout | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Decoder with an optional KV cache (`Cache`: every layer's keys and values, stacked).

        x [B, T, D], positions [3, B, T] -> (hidden [B, T, D], cache). `attn`: `layers.Segments`
        when the tokens attend to themselves (no cache: training; with one: a prefill, written
        at entries 0..T-1); `layers.Live` [B] for a decode step (one token per row, written at
        entry index [B] of its row, attending to its live entries). The layers run as one
        scanned body (remat'd with `cfg.remat` when there is no cache: training). `dropout`
        (training only, no cache): the LoRA dropout, one key per layer scanned alongside.
        """
        t = self.cfg.text
        x = sharding.constrain(x, ("batch", "seq", "embed"))
        cos, sin = mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section)
        if cache is None:
            body = lambda layer, h, d: (layer(h, cos, sin, attn, dropout=d)[0], None)
            per_layer = lora.split(dropout, t.num_layers)  # None: no xs, today's program
            x, _ = stack.scan(
                self.layers, body, x, per_layer, remat=self.cfg.layer_remat, unroll=self.cfg.unroll_layers
            )
            return self.norm(x), None
        if dropout is not None:
            raise ValueError("LoRA dropout is for training passes, which run without a KV cache")

        def body(layer, carry, i):
            h, kv = carry
            return layer(h, cos, sin, attn, kv, index, i), None

        (x, cache), _ = stack.scan(
            self.layers, body, (x, cache), jnp.arange(t.num_layers), unroll=self.cfg.unroll_layers
        )
        return self.norm(x), cache

    def logits(self, h: jax.Array, dropout: lora.Dropout | None = None) -> jax.Array:
        """Hidden states [..., D] -> fp32 logits [..., V]. `dropout` (training passes only): the
        LoRA dropout of an adapted lm_head (a caller computing the logits in pieces gives each
        piece its own)."""
        if self.lm_head is None:
            out = jnp.dot(h, self.embed_tokens[...].astype(h.dtype).T)
        else:
            out = self.lm_head(h, lora.fold(dropout, _HEAD))
        return out.astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        pixels: jax.Array | None = None,
        layout: VisionLayout | None = None,
        dropout: lora.Dropout | None = None,
    ) -> jax.Array:
        """input_ids [B, T], positions [3, B, T], attention_mask [B, T] -> logits [B, T, V] (fp32).
        `dropout`: the LoRA dropout of a training pass (None: none, as in every other pass)."""
        x = self.embed(input_ids, pixels, layout, dropout)
        return self.logits(self.hidden_states(x, positions, attention_mask, dropout=dropout), dropout)


def _scatter_features(x: jax.Array, is_pad: jax.Array, features: jax.Array) -> jax.Array:
    """Writes features [M, D] at the True positions of is_pad [B, T], in reading order: the
    k-th pad token gets row k, so rows past the number of pad tokens (bucket filler) are unread."""
    b, t, d = x.shape
    idx = jnp.clip(jnp.cumsum(is_pad.reshape(-1)) - 1, 0, features.shape[0] - 1)
    return jnp.where(is_pad[..., None], features[idx].reshape(b, t, d), x)


def prepare_inputs(
    cfg: ModelConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    image_index=None,
) -> dict:
    """Host batch -> keyword arguments of `Qwen25VL.__call__` (numpy), plus `rope_deltas` [B].

    pixel_values / pixel_values_videos are the processor's rows [n, C] for all images / videos
    of the batch in order. image_index [K] (optional): the batch shows K images in reading
    order, the k-th being image image_index[k] of pixel_values / image_grid_thw, so an image
    shown by several rows is given (and encoded) once. Checks that pad-token counts match the
    grids. With `cfg.vision_buckets`, `pixels` [L, C] and the layout are padded to the
    smallest bucket L >= n; past the largest, to a power-of-two count of largest buckets,
    encoded chunk by chunk (`vision_layout`; raises only for an image past the largest).
    """
    input_ids = np.asarray(input_ids)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    shown = image_grid_thw
    if image_index is not None:
        if image_grid_thw is None:
            raise ValueError("image_index needs image_grid_thw")
        shown = np.asarray(image_grid_thw).reshape(-1, 3)[np.asarray(image_index)]
    positions, deltas = get_rope_index(input_ids, cfg, mask, shown, video_grid_thw, second_per_grid_ts)
    out = dict(
        input_ids=input_ids.astype(np.int32),
        positions=positions.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        rope_deltas=deltas.astype(np.int32),
    )
    has_img, has_vid = image_grid_thw is not None, video_grid_thw is not None
    if (pixel_values is None) != (not has_img) or (pixel_values_videos is None) != (not has_vid):
        raise ValueError("pixel_values and image_grid_thw (and the video pair) must be given together")
    if not (has_img or has_vid):
        return out
    vc = cfg.vision
    for name, token_id, grid in (
        ("image", cfg.image_token_id, shown),
        ("video", cfg.video_token_id, video_grid_thw),
    ):
        need = 0 if grid is None else int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum()) // vc.merge_unit
        have = int((input_ids[mask.astype(bool)] == token_id).sum())
        if need != have:
            raise ValueError(f"{have} {name} pad tokens in input_ids but the {name} grids give {need} features")
    layout = vision_layout(image_grid_thw, video_grid_thw, vc, cfg.vision_buckets, image_index)
    rows = [np.asarray(p).reshape(-1, vc.patch_dim) for p in (pixel_values, pixel_values_videos) if p is not None]
    out["pixels"] = order_pixels(np.concatenate(rows), layout).astype(np.float32)
    out["layout"] = layout
    return out


def abstract_model(cfg: ModelConfig) -> Qwen25VL:
    """The model with ShapeDtypeStruct leaves: no memory, no device."""
    return nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))


def create_model(cfg: ModelConfig, mesh: Mesh, rules, seed: int = 0) -> Qwen25VL:
    """Random-init model, each parameter drawn directly in its sharding.

    One small jitted program per distinct (initializer, shape, dtype, sharding), so a 3B
    model compiles a dozen tiny programs instead of one with hundreds of RNG kernels. Each
    layer of a stacked parameter is drawn with the key it had when every layer was its own
    module, so a seed gives the same model as before the layers were stacked. LoRA adapters
    are numbered after every base parameter: a seed's base is the same with or without them.
    """
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    return nnx.merge(graphdef, nnx.from_flat_state(init_params(nnx.to_flat_state(abs_state), mesh, rules, seed)))


def init_params(flat: list, mesh: Mesh, rules, seed: int, only=None) -> list:
    """(path, Variable) of the abstract model's flat state `flat`, each drawn with its key of
    `seed` in its sharding; `only` (a Variable type): just those (load_hf: the LoRA adapters of
    a checkpoint's model, drawn as create_model draws them)."""
    base = jax.random.key(seed)
    depths = {p: v.shape[0] for p, v in flat if _stack_of(p)}
    number = _per_layer_numbers([p for p, v in flat if not isinstance(v, lora.LoRAParam)], depths)
    taken = sum(len(n) for n in number.values())
    adapters = _per_layer_numbers([p for p, v in flat if isinstance(v, lora.LoRAParam)], depths)
    number.update({p: [taken + n for n in ns] for p, ns in adapters.items()})
    leaves = []
    for path, v in flat:
        if only is not None and not isinstance(v, only):
            continue
        meta = v.get_metadata()
        target = sharding.named_sharding(meta["axes"], v.shape, mesh, rules)
        shape, dtype = tuple(v.shape), jnp.dtype(v.dtype)
        if _stack_of(path):
            keys = jnp.stack([jax.random.fold_in(base, n) for n in number[path]])
            value = _init_stacked_program(meta["init"], shape, dtype, target)(keys)
        else:
            value = _init_program(meta["init"], shape, dtype, target)(jax.random.fold_in(base, number[path][0]))
        leaves.append((path, v.replace(value)))
    return leaves


STACKS = (("layers",), ("visual", "blocks"))  # where the stacked modules sit in the parameter tree


def _stack_of(path: tuple) -> tuple | None:
    return next((s for s in STACKS if path[: len(s)] == s), None)


def _per_layer_numbers(paths: list[tuple], depths: dict[tuple, int]) -> dict[tuple, list[int]]:
    """Each parameter's position(s) in the per-layer tree (`layers/0/...`, one per layer of a
    stacked one), in nnx's sorted flat order: the numbers its layers' keys are folded with."""
    expanded = {}
    for p in paths:
        s = _stack_of(p)
        per = [p] if s is None else [p[: len(s)] + (i,) + p[len(s) :] for i in range(depths[p])]
        expanded[p] = per
    order = {q: i for i, q in enumerate(sorted(q for per in expanded.values() for q in per))}
    return {p: [order[q] for q in per] for p, per in expanded.items()}


@functools.cache
def _init_program(init: str, shape: tuple[int, ...], dtype, target):
    return jax.jit(lambda key: layers.INITS[init](key, shape, dtype), out_shardings=target)


@functools.cache
def _init_stacked_program(init: str, shape: tuple[int, ...], dtype, target):
    """Keys [Y] -> a stacked parameter [Y, ...], layer i drawn with key i alone."""
    draw = lambda key: layers.INITS[init](key, shape[1:], dtype)
    return jax.jit(jax.vmap(draw), out_shardings=target)
