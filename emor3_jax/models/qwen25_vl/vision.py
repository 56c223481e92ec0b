"""The Qwen2.5-VL vision tower.

Letters: L patches, W windows, P patches per window (padded), M merged tokens, C patch row
(C*T*P*P pixels), E vision width, N heads, H head dim.

Patches arrive already in *window order* (`VisionLayout.patch_order` applied on the host):
the merge units of each attention window are contiguous, as transformers permutes them, and
so are the patches of each frame. Attention never builds an [L, L] mask over the batch:
window blocks gather the sequence into [W, P] windows and full-attention blocks into
[F, Lf] frames (F frames, Lf the largest frame), so memory grows linearly with the number
of windows and images. The merged tokens come out in window order and
`VisionLayout.merged_image`/`merged_video` gather them back into reading order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from emor3_jax.models.qwen25_vl import layers
from emor3_jax.models.qwen25_vl.config import VisionConfig
from emor3_jax.models.qwen25_vl.rope import vision_cos_sin
from emor3_jax.runtime import sharding


@struct.dataclass
class VisionLayout:
    """Host-computed index arrays for one batch of images/videos (numpy or jax arrays).

    patch_order [L]: pixel row (processor order) feeding each window-ordered patch.
    pos_hw [L, 2]: (row, column) of each window-ordered patch, for the 2-D rotary embedding.
    windows [W, P]: window-ordered patch index of each window slot; L marks an empty slot.
    unwindow [L]: flat slot (w * P + p) holding each patch, to undo the gather.
    frames [F, Lf], unframe [L]: the same for frames (full attention stays inside a frame).
    merged_image [Mi], merged_video [Mv]: window-ordered merged token behind each image /
    video token in reading order.
    """

    patch_order: np.ndarray
    pos_hw: np.ndarray
    windows: np.ndarray
    unwindow: np.ndarray
    frames: np.ndarray
    unframe: np.ndarray
    merged_image: np.ndarray
    merged_video: np.ndarray


def _grid_layout(t: int, h: int, w: int, cfg: VisionConfig):
    """Window order of one grid (in merge units) and its window sizes, per transformers."""
    m, win = cfg.spatial_merge_size, cfg.window_merge_units
    lh, lw = h // m, w // m
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    nwh, nww = -(-lh // win), -(-lw // win)
    padded = np.full((t, nwh * win, nww * win), -1)
    padded[:, :lh, :lw] = index
    blocks = padded.reshape(t, nwh, win, nww, win).transpose(0, 1, 3, 2, 4).reshape(t * nwh * nww, win * win)
    order, sizes = [], []
    for blk in blocks:
        keep = blk[blk >= 0]
        if keep.size:
            order.append(keep)
            sizes.append(keep.size)
    return np.concatenate(order), sizes


def _patch_hw(t: int, h: int, w: int, m: int) -> np.ndarray:
    """[t*h*w, 2] (row, col) of each patch in processor order (merge blocks contiguous)."""
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // m, m, w // m, m)
    hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hh, ww], axis=-1), (t, 1))


def _blocks(sizes: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive runs of `sizes` patches as rows of a [len(sizes), width] gather index
    (padding = total count, one past the last patch) and the flat slot of each patch."""
    n = sum(sizes)
    blocks = np.full((len(sizes), width), n, np.int32)
    unblock = np.zeros((n,), np.int32)
    start = 0
    for i, size in enumerate(sizes):
        blocks[i, :size] = np.arange(start, start + size)
        unblock[start : start + size] = i * width + np.arange(size)
        start += size
    return blocks, unblock


def vision_layout(image_grid_thw, video_grid_thw, cfg: VisionConfig) -> VisionLayout:
    """Index arrays for images (first) and videos (after) fed through the tower together."""
    image_grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    video_grid = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)
    grids = np.concatenate([image_grid, video_grid]).astype(np.int64)
    if not grids.size:
        raise ValueError("vision_layout: no image or video grids")
    mu, m = cfg.merge_unit, cfg.spatial_merge_size
    p_max = cfg.window_merge_units**2 * mu
    unit_order, window_sizes, frame_sizes, pos_hw = [], [], [], []
    unit_base = 0
    for t, h, w in grids.tolist():
        if h % m or w % m:
            raise ValueError(f"grid {(t, h, w)}: height and width must be multiples of spatial_merge_size {m}")
        order, sizes = _grid_layout(t, h, w, cfg)
        unit_order.append(order + unit_base)
        window_sizes += [s * mu for s in sizes]
        frame_sizes += [h * w] * t
        pos_hw.append(_patch_hw(t, h, w, m))
        unit_base += t * (h // m) * (w // m)
    unit_order = np.concatenate(unit_order)
    patch_order = (unit_order[:, None] * mu + np.arange(mu)).reshape(-1)
    windows, unwindow = _blocks(window_sizes, p_max)
    frames, unframe = _blocks(frame_sizes, max(frame_sizes))
    reverse = np.argsort(unit_order).astype(np.int32)  # reading-order merged token -> window order
    n_img = int((image_grid[:, 0] * image_grid[:, 1] * image_grid[:, 2]).sum()) // mu
    return VisionLayout(
        patch_order=patch_order.astype(np.int32),
        pos_hw=np.concatenate(pos_hw)[patch_order].astype(np.int32),
        windows=windows,
        unwindow=unwindow,
        frames=frames,
        unframe=unframe,
        merged_image=reverse[:n_img],
        merged_video=reverse[n_img:],
    )


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, impl: str, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        e = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.qkv = layers.Linear(e, 3 * e, ("vision_embed", "vision_heads"), bias=True, **kw)
        self.proj = layers.Linear(e, e, ("vision_heads", "vision_embed"), bias=True, **kw)
        self.num_heads, self.impl = cfg.num_heads, impl

    def __call__(self, x, cos, sin, blocks, unblock):
        """x [L, E] -> [L, E], attending within each row of `blocks` [W, P] (windows or frames)."""
        n_patch = x.shape[0]
        qkv = self.qkv(x).reshape(n_patch, 3, self.num_heads, -1)  # [L, 3, N, H]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        gather = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:1])])[blocks]  # [W, P, N, H]
        valid = blocks < n_patch  # [W, P]
        mask = (valid[:, :, None] & valid[:, None, :])[:, None]  # [W, 1, P, P]
        out = layers.attention(gather(q), gather(k), gather(v), mask, self.impl)
        out = out.reshape(-1, *out.shape[2:])[unblock]  # [L, N, H]
        return self.proj(out.reshape(n_patch, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, impl: str, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layers.RMSNorm(cfg.hidden_size, 1e-6, "norm", **kw)
        self.norm2 = layers.RMSNorm(cfg.hidden_size, 1e-6, "norm", **kw)
        self.attn = VisionAttention(cfg, impl, compute_dtype=compute_dtype, **kw)
        self.mlp = layers.GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            ("vision_embed", "vision_mlp"),
            bias=True,
            compute_dtype=compute_dtype,
            **kw,
        )

    def __call__(self, x, cos, sin, blocks, unblock):
        x = x + self.attn(self.norm1(x), cos, sin, blocks, unblock)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then 2x2 neighbouring patches concatenated -> MLP (GELU) -> text width."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size * cfg.merge_unit
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.ln_q = layers.RMSNorm(cfg.hidden_size, 1e-6, "norm", param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.Linear(d, d, ("vision_mlp", "vision_embed"), bias=True, **kw)
        self.fc2 = layers.Linear(d, cfg.out_hidden_size, ("vision_embed", "embed"), bias=True, **kw)
        self.merge_unit = cfg.merge_unit

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, x.shape[-1] * self.merge_unit)  # [M, 4E]
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    """`remat`: each block's activations are recomputed in the backward pass instead of kept
    (a 448x448 image holds ~2.5 GB of them across the 3B tower's 32 blocks)."""

    def __init__(
        self, cfg: VisionConfig, impl: str, *, param_dtype, compute_dtype, rngs: nnx.Rngs, remat: bool = False
    ):
        self.cfg, self.remat = cfg, remat
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.patch_embed = layers.Linear(cfg.patch_dim, cfg.hidden_size, ("patch", "vision_embed"), bias=False, **kw)
        self.blocks = nnx.List([VisionBlock(cfg, impl, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)

    def __call__(self, pixels: jax.Array, layout: VisionLayout, return_blocks: bool = False):
        """pixels [L, C] in window order -> merged tokens [M, D] in window order.

        With `return_blocks`, also the hidden states [L, E] after each block.
        """
        cos, sin = vision_cos_sin(layout.pos_hw, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.patch_embed(pixels)
        x = sharding.constrain(x, ("seq", "vision_embed"))
        hidden = []
        for i, block in enumerate(self.blocks):
            run = _remat_block if self.remat and not return_blocks else VisionBlock.__call__
            if i in self.cfg.fullatt_block_indexes:
                x = run(block, x, cos, sin, layout.frames, layout.unframe)
            else:
                x = run(block, x, cos, sin, layout.windows, layout.unwindow)
            hidden.append(x)
        merged = self.merger(x)
        return (merged, hidden) if return_blocks else merged


@nnx.remat
def _remat_block(block: VisionBlock, x, cos, sin, blocks, unblock):
    return block(x, cos, sin, blocks, unblock)


def order_pixels(pixel_values: np.ndarray, layout: VisionLayout) -> np.ndarray:
    """Processor-order pixel rows [L, C] -> window order (host side, once per batch)."""
    pixel_values = np.asarray(pixel_values)
    if pixel_values.shape[0] != layout.patch_order.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows, the grids need {layout.patch_order.shape[0]}")
    return pixel_values[layout.patch_order]
