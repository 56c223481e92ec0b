"""The Qwen2.5-VL vision tower.

Letters: L patches (padded to a bucket), R rows, S slots per row, M merged tokens, C patch
row (C*T*P*P pixels), E vision width, N heads, H head dim.

Patches arrive already in *window order* (`VisionLayout.patch_order` applied on the host):
the merge units of each attention window are contiguous, as transformers permutes them, and
so are the patches of each frame. Attention never builds an [L, L] mask over the batch:
window blocks and full-attention blocks (frames) are packed into rows of S slots ([R, S]
`Blocks`, several short blocks per row, each attending only to itself), so memory grows
linearly with the number of patches. The merged tokens come out in window order and
`VisionLayout.merged_image`/`merged_video` gather them back into reading order.

With `vision_buckets`, the patches are padded to the smallest bucket that holds them, and
every other shape follows from the bucket (and, for frames, the bucket of the largest
frame): padding patches are zero pixels in attention blocks of their own, and their merged
tokens are never read, so real outputs are those of the unpadded batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from emor3_jax.core import sharding
from emor3_jax.models import lora
from emor3_jax.models.qwen25_vl import layers, stack
from emor3_jax.models.qwen25_vl.config import VisionConfig
from emor3_jax.models.qwen25_vl.rope import vision_cos_sin


@struct.dataclass
class Blocks:
    """Attention blocks (windows or frames) over the window-ordered patches, packed in rows.

    index [R, S]: patch in each slot; L (one past the last patch) marks an empty slot.
    segment [R, S]: block id of each slot; a slot attends to the slots of its row with the
    same id (empty slots share -1 and see only each other).
    unblock [L]: flat slot (r * S + s) holding each patch, to undo the gather.
    """

    index: np.ndarray
    segment: np.ndarray
    unblock: np.ndarray


@struct.dataclass
class VisionLayout:
    """Host-computed index arrays for one batch of images/videos (numpy or jax arrays).

    patch_order [L]: pixel row (processor order) feeding each window-ordered patch; -1 for a
    padding patch (zero pixels).
    pos_hw [L, 2]: (row, column) of each window-ordered patch, for the 2-D rotary embedding.
    windows: window blocks, rows of S = window_merge_units**2 * merge_unit slots.
    frames: one block per frame (full attention stays inside a frame), rows as wide as the
    largest frame (or its bucket).
    merged_image [Mi], merged_video [Mv]: window-ordered merged token behind each image /
    video token in reading order (padded to L / merge_unit with 0s, which `embed` never
    reads: it takes as many as there are pad tokens).
    """

    patch_order: np.ndarray
    pos_hw: np.ndarray
    windows: Blocks
    frames: Blocks
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


def _pack(sizes: list[int], total: int, width: int, bucketed: bool) -> Blocks:
    """Consecutive runs of `sizes` patches (one block each), then `total - sum(sizes)` padding
    patches, packed into rows of `width` slots.

    Runs go largest first, next fit (into the last row, else a new one), so two neighbouring
    rows always hold more than `width` patches: at most ceil(2 * total / width) rows. Padding
    fills the gaps, then whole rows, one block per row. Unbucketed: as many rows as needed.
    Bucketed: ceil(total / width) rows when they hold everything, else the bound; two shapes
    per (total, width), whatever the sizes.
    """
    sizes = np.asarray(sizes, np.int64)
    n_real = int(sizes.sum())
    row_of, col_of, fill = np.zeros_like(sizes), np.zeros_like(sizes), []
    for i in np.argsort(-sizes, kind="stable"):
        if not fill or fill[-1] + sizes[i] > width:
            fill.append(0)
        row_of[i], col_of[i] = len(fill) - 1, fill[-1]
        fill[-1] += sizes[i]
    rows = max(len(fill), -(-total // width))
    if bucketed and rows > -(-total // width):
        rows = -(-2 * total // width)
    run = np.repeat(np.arange(len(sizes)), sizes)  # [n_real] run of each real patch
    starts = np.cumsum(sizes) - sizes
    real_slot = row_of[run] * width + col_of[run] + np.arange(n_real) - starts[run]
    free = np.ones(rows * width, bool)
    free[real_slot] = False
    pad_slot = np.flatnonzero(free)[: total - n_real]  # padding in the free slots, row by row
    slot = np.concatenate([real_slot, pad_slot])
    index = np.full(rows * width, total, np.int32)
    index[slot] = np.arange(total)
    segment = np.full(rows * width, -1, np.int32)
    segment[slot] = np.concatenate([run, len(sizes) + pad_slot // width])  # padding: a block per row
    return Blocks(index.reshape(rows, width), segment.reshape(rows, width), slot.astype(np.int32))


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(
        f"an image (or video) of {n} patches exceeds the largest vision bucket {buckets[-1]}: add a larger bucket to "
        "--config.model.vision_buckets (ModelConfig.vision_buckets) or lower data.max_pixels"
    )


def _extent(n: int, buckets: Sequence[int]) -> int:
    """Patches a batch of n is padded to: the smallest bucket holding n, past the largest a
    power-of-two count of largest buckets (a bounded number of shapes for any batch)."""
    if n <= buckets[-1]:
        return _bucket(n, buckets)
    return buckets[-1] << (-(-n // buckets[-1]) - 1).bit_length()


def _ranges(starts, lengths) -> np.ndarray:
    """The integers [s, s + n) for each (s, n), one run after another."""
    return np.concatenate([np.zeros(0, np.int64)] + [np.arange(s, s + n) for s, n in zip(starts, lengths)])


def _chunks(sizes: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Grids (of `sizes` patches) into chunks of at most `capacity` patches, first fit from the
    largest: each chunk's grid indices, increasing. A grid is never split (none exceeds `capacity`)."""
    fill: list[int] = []
    members: list[list[int]] = []
    for i in np.argsort(-sizes, kind="stable"):
        k = next((k for k, f in enumerate(fill) if f + sizes[i] <= capacity), len(fill))
        if k == len(fill):
            fill.append(0)
            members.append([])
        fill[k] += int(sizes[i])
        members[k].append(int(i))
    return [np.sort(np.asarray(m, np.int64)) for m in members]


class _Part(NamedTuple):
    """One tower batch of grids: patch_order [L] into their pixel rows, pos_hw [L, 2], the
    window and frame Blocks, and reverse [n / merge_unit]: the window-ordered merged token
    behind each reading-order one."""

    patch_order: np.ndarray
    pos_hw: np.ndarray
    windows: Blocks
    frames: Blocks
    reverse: np.ndarray


def _part(grids: np.ndarray, cfg: VisionConfig, total: int, frame_width: int, bucketed: bool) -> _Part:
    """Window layout of `grids` [I, 3] (none: all padding), padded to `total` patches, frame
    rows `frame_width` wide (0: as wide as the largest frame)."""
    mu, m = cfg.merge_unit, cfg.spatial_merge_size
    unit_order, window_sizes, frame_sizes, pos_hw = [np.zeros(0, np.int64)], [], [], [np.zeros((0, 2), np.int64)]
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
    pad = total - patch_order.size
    return _Part(
        patch_order=np.pad(patch_order, (0, pad), constant_values=-1).astype(np.int32),
        pos_hw=np.pad(np.concatenate(pos_hw)[patch_order], ((0, pad), (0, 0))).astype(np.int32),
        windows=_pack(window_sizes, total, cfg.window_merge_units**2 * mu, bucketed),
        frames=_pack(frame_sizes, total, frame_width or max(frame_sizes), bucketed),
        reverse=np.argsort(unit_order).astype(np.int32),
    )


def _stack(blocks: list[Blocks], total: int) -> Blocks:
    """Chunks' Blocks [R_k, S] -> [K, R, S], each padded with empty rows to the most rows."""
    rows = max(b.index.shape[0] for b in blocks)
    grow = lambda a, fill: np.pad(a, ((0, rows - a.shape[0]), (0, 0)), constant_values=fill)
    return Blocks(
        index=np.stack([grow(b.index, total) for b in blocks]),
        segment=np.stack([grow(b.segment, -1) for b in blocks]),
        unblock=np.stack([b.unblock for b in blocks]),
    )


def _chunked(grids: np.ndarray, cfg: VisionConfig, buckets: Sequence[int]) -> _Part:
    """The grids in chunks of the largest bucket B (none split), a power-of-two count of them:
    patch_order [K * B] into the batch's pixel rows, Blocks [K, R, S] of chunk-local patches,
    reverse into the chunks' merged tokens laid end to end."""
    mu, width = cfg.merge_unit, buckets[-1]
    sizes = grids.prod(axis=1)
    _bucket(int(sizes.max()), buckets)  # raises for an image no chunk holds
    members = _chunks(sizes, width)
    members += [np.zeros(0, np.int64)] * (_extent(int(sizes.sum()), buckets) // width - len(members))
    frame_width = _bucket(int((grids[:, 1] * grids[:, 2]).max()), buckets)
    starts = np.cumsum(sizes) - sizes  # first pixel row of each grid
    parts, patch_order, reverse = [], [], np.zeros(int(sizes.sum()) // mu, np.int32)
    for k, grid_ids in enumerate(members):
        part = _part(grids[grid_ids], cfg, width, frame_width, True)
        rows = _ranges(starts[grid_ids], sizes[grid_ids])  # the chunk's pixel rows in the batch's
        patch_order.append(np.append(rows, -1)[part.patch_order])  # -1 (padding) stays -1
        reverse[_ranges(starts[grid_ids] // mu, sizes[grid_ids] // mu)] = part.reverse + k * width // mu
        parts.append(part)
    return _Part(
        patch_order=np.concatenate(patch_order).astype(np.int32),
        pos_hw=np.concatenate([p.pos_hw for p in parts]),
        windows=_stack([p.windows for p in parts], width),
        frames=_stack([p.frames for p in parts], width),
        reverse=reverse,
    )


def vision_layout(
    image_grid_thw, video_grid_thw, cfg: VisionConfig, buckets: Sequence[int] = (), image_index=None
) -> VisionLayout:
    """Index arrays for images (first) and videos (after) fed through the tower together.

    `buckets` (increasing patch counts; empty: no padding): the patches are padded to the
    smallest bucket holding them, frame rows to the smallest holding the largest frame. A batch
    past the largest bucket is laid out in chunks of it (`_chunked`), which the tower encodes
    one after another; only an image (or video) larger than the largest bucket raises.
    image_index [K] (optional): the images the tokens show in reading order, as indices into
    image_grid_thw (an image may be shown several times); `merged_image` then repeats an
    image's merged tokens each time it is shown, padded to a bucket of its own.
    """
    image_grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    video_grid = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)
    grids = np.concatenate([image_grid, video_grid]).astype(np.int64)
    if not grids.size:
        raise ValueError("vision_layout: no image or video grids")
    mu, n = cfg.merge_unit, int(grids.prod(axis=1).sum())
    if buckets and n > buckets[-1]:
        part = _chunked(grids, cfg, buckets)
    elif buckets:
        frame_width = _bucket(int((grids[:, 1] * grids[:, 2]).max()), buckets)  # <= total: a frame is in the batch
        part = _part(grids, cfg, _bucket(n, buckets), frame_width, True)
    else:
        part = _part(grids, cfg, n, 0, False)
    total = part.patch_order.size
    counts = image_grid.prod(axis=1) // mu  # merged tokens per image
    n_img = int(counts.sum())
    merged = [part.reverse[:n_img], part.reverse[n_img:]]
    if image_index is not None:
        starts = np.cumsum(counts) - counts
        merged[0] = np.concatenate([part.reverse[starts[i] : starts[i] + counts[i]] for i in image_index])
    if buckets:  # a fixed length per bucket; the filler is never read
        lengths = [max(total, _extent(a.size * mu, buckets)) // mu for a in merged]
        merged = [np.pad(a, (0, n - a.size)) if a.size else a for a, n in zip(merged, lengths)]
    return VisionLayout(part.patch_order, part.pos_hw, part.windows, part.frames, merged[0], merged[1])


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, impl: str, *, param_dtype, compute_dtype, rngs: nnx.Rngs, adapter=None):
        e = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs, adapter=adapter)
        self.qkv = layers.Linear(e, 3 * e, ("vision_embed", "vision_heads"), bias=True, **kw)
        self.proj = layers.Linear(e, e, ("vision_heads", "vision_embed"), bias=True, **kw)
        self.num_heads, self.impl = cfg.num_heads, impl

    def __call__(self, x, cos, sin, windows: Blocks, frames: Blocks, full: jax.Array, dropout=None):
        """x [L, E] -> [L, E], each patch attending to its frame (full: a scalar bool, this
        block's per-layer flag) or else to its window: a branch taken at run time, so every
        block of the scanned tower is the same program. `dropout` (a lora.Dropout, training):
        folded with 0, 1 for qkv, proj (4-6 are the block's MLP)."""
        n_patch = x.shape[0]
        qkv = self.qkv(x, lora.fold(dropout, 0)).reshape(n_patch, 3, self.num_heads, -1)  # [L, 3, N, H]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        within = lambda blocks: lambda: _blocked_attention(q, k, v, blocks, self.impl)
        out = jax.lax.cond(full, within(frames), within(windows))
        return self.proj(out.reshape(n_patch, -1), lora.fold(dropout, 1))


def _blocked_attention(q, k, v, blocks: Blocks, impl: str) -> jax.Array:
    """q/k/v [L, N, H] -> [L, N, H], each patch attending to the patches of its block."""
    gather = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:1])])[blocks.index]  # [R, S, N, H]
    seg = blocks.segment + 1  # [R, S]; empty slots (-1) become padding (0)
    out = layers.attention(gather(q), gather(k), gather(v), layers.Segments(seg, seg, causal=False), impl)
    return out.reshape(-1, *out.shape[2:])[blocks.unblock]


class VisionBlock(nnx.Module):
    """`adapter`: the LoRA adapter of its attention and MLP projections (None: none)."""

    def __init__(self, cfg: VisionConfig, impl: str, *, param_dtype, compute_dtype, rngs: nnx.Rngs, adapter=None):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layers.RMSNorm(cfg.hidden_size, 1e-6, "norm", **kw)
        self.norm2 = layers.RMSNorm(cfg.hidden_size, 1e-6, "norm", **kw)
        self.attn = VisionAttention(cfg, impl, compute_dtype=compute_dtype, adapter=adapter, **kw)
        self.mlp = layers.GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            ("vision_embed", "vision_mlp"),
            bias=True,
            compute_dtype=compute_dtype,
            adapter=adapter,
            **kw,
        )

    def __call__(self, x, cos, sin, windows: Blocks, frames: Blocks, full: jax.Array, dropout=None):
        x = x + self.attn(self.norm1(x), cos, sin, windows, frames, full, dropout)
        return x + self.mlp(self.norm2(x), dropout)


class PatchMerger(nnx.Module):
    """RMSNorm, then 2x2 neighbouring patches concatenated -> MLP (GELU) -> text width."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs, adapter=None):
        d = cfg.hidden_size * cfg.merge_unit
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs, adapter=adapter)
        self.ln_q = layers.RMSNorm(cfg.hidden_size, 1e-6, "norm", param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.Linear(d, d, ("vision_mlp", "vision_embed"), bias=True, **kw)
        self.fc2 = layers.Linear(d, cfg.out_hidden_size, ("vision_embed", "embed"), bias=True, **kw)
        self.merge_unit = cfg.merge_unit

    def __call__(self, x, dropout: lora.Dropout | None = None):
        """x [L, E] -> [M, D]; `dropout` (training) folded with 0, 1 for fc1, fc2."""
        x = self.ln_q(x).reshape(-1, x.shape[-1] * self.merge_unit)  # [M, 4E]
        return self.fc2(jax.nn.gelu(self.fc1(x, lora.fold(dropout, 0)), approximate=False), lora.fold(dropout, 1))


class VisionTower(nnx.Module):
    """The blocks are one stacked module run as a scan (`stack`); which of them attend over
    whole frames (`fullatt_block_indexes`) is per-block data scanned alongside. `remat` (a
    stack.REMAT_POLICIES name, None: off): each block's activations are recomputed in the
    backward pass instead of kept (a 448x448 image holds ~2.5 GB of them across the 3B tower's
    32 blocks)."""

    def __init__(
        self,
        cfg: VisionConfig,
        impl: str,
        *,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
        remat: str | None = None,
        unroll: bool = False,
        adapters=(None, None),
    ):
        """`adapters`: the LoRA adapters of the blocks and of the merger (None: none)."""
        self.cfg, self.remat, self.unroll = cfg, remat, unroll
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.patch_embed = layers.Linear(cfg.patch_dim, cfg.hidden_size, ("patch", "vision_embed"), bias=False, **kw)
        make = lambda r: VisionBlock(cfg, impl, adapter=adapters[0], **dict(kw, rngs=r))
        self.blocks = stack.stacked(make, cfg.depth, rngs)  # one module, parameters [depth, ...]
        self.merger = PatchMerger(cfg, adapter=adapters[1], **kw)

    def __call__(
        self,
        pixels: jax.Array,
        layout: VisionLayout,
        return_blocks: bool = False,
        dropout: lora.Dropout | None = None,
    ):
        """pixels [L, C] in window order -> merged tokens [M, D] in window order.

        With `return_blocks`, also the hidden states [depth, L, E] after each block. A chunked
        layout (Blocks [K, R, S]: the batch past the largest bucket, `vision_layout`) is encoded
        one chunk of L / K patches after another in a loop inside the program, so its memory is
        that of one chunk; the chunks' outputs come back laid end to end. `dropout` (training):
        the LoRA dropout of the blocks' and merger's adapters, each chunk with its own key.
        """
        if layout.windows.index.ndim == 2:
            return self._encode(pixels, layout.pos_hw, layout.windows, layout.frames, return_blocks, dropout)
        k = layout.windows.index.shape[0]
        chunks = (pixels.reshape(k, -1, pixels.shape[-1]), layout.pos_hw.reshape(k, -1, 2))
        graphdef, state = nnx.split(self)  # merged inside the loop: its Variables live in the loop's trace (remat)
        encode = lambda a: nnx.merge(graphdef, state, copy=True)._encode(*a[:4], return_blocks, a[4])
        xs = (*chunks, layout.windows, layout.frames, lora.split(dropout, k))
        out = jax.lax.map(encode, xs)  # [K, ...] per chunk
        if not return_blocks:
            return out.reshape(-1, out.shape[-1])
        merged, hidden = out  # hidden [K, depth, L / K, E] -> [depth, L, E]
        return merged.reshape(-1, merged.shape[-1]), jnp.swapaxes(hidden, 0, 1).reshape(
            self.cfg.depth, -1, hidden.shape[-1]
        )

    def _encode(self, pixels, pos_hw, windows: Blocks, frames: Blocks, return_blocks: bool, dropout=None):
        """One tower batch: pixels [L, C], pos_hw [L, 2], Blocks [R, S] -> merged [M, D] (and
        hidden); `dropout` (a lora.Dropout): one key per block scanned alongside, the merger's
        folded with `depth` (patch_embed has no adapter)."""
        cos, sin = vision_cos_sin(pos_hw, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.patch_embed(pixels)
        x = sharding.constrain(x, ("seq", "vision_embed"))
        full = np.isin(np.arange(self.cfg.depth), self.cfg.fullatt_block_indexes)  # [depth]

        def body(block, h, xs):
            f, d = xs
            h = block(h, cos, sin, windows, frames, f, d)
            return h, h if return_blocks else None

        xs = (jnp.asarray(full), lora.split(dropout, self.cfg.depth))  # no dropout: (full, None), today's program
        x, hidden = stack.scan(
            self.blocks, body, x, xs, remat=None if return_blocks else self.remat, unroll=self.unroll
        )
        merged = self.merger(x, lora.fold(dropout, self.cfg.depth))
        return (merged, hidden) if return_blocks else merged


def order_pixels(pixel_values: np.ndarray, layout: VisionLayout) -> np.ndarray:
    """Processor-order pixel rows [n, C] -> window order [L, C], padding patches zero (host
    side, once per batch)."""
    pixel_values = np.asarray(pixel_values)
    need = int((layout.patch_order >= 0).sum())
    if pixel_values.shape[0] != need:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows, the grids need {need}")
    return np.concatenate([pixel_values, np.zeros_like(pixel_values[:1])])[layout.patch_order]  # -1: zero row
