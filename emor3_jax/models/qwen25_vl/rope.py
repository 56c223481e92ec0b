"""Rotary embeddings: M-RoPE position ids (host, numpy) and cos/sin tables (device, fp32).

M-RoPE gives every token three position ids (temporal, height, width). Text tokens use the
same id on all three; the tokens of an image or video grid count over their grid, offset by
the position reached before them. After a grid the text continues at max(h, w) / merge past
the grid's start. `rope_delta` = (last position + 1) - (number of real tokens), what decode
adds to the plain token index.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

from emor3_jax.models.qwen25_vl.config import ModelConfig

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """[B, T] -> [B, T] int: 0 text, 1 image pad, 2 video pad."""
    return np.where(input_ids == cfg.image_token_id, IMAGE, np.where(input_ids == cfg.video_token_id, VIDEO, TEXT))


def _grid_positions(start: int, grid_thw, merge: int, time_interval: float) -> np.ndarray:
    """[3, t*h*w] positions of one image/video grid (merged units)."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    tt = (np.arange(t) * time_interval).astype(np.int64) + start
    hh = np.arange(h) + start
    ww = np.arange(w) + start
    grid = np.stack(np.meshgrid(tt, hh, ww, indexing="ij"), axis=0)
    return grid.reshape(3, -1)


def get_rope_index(
    input_ids: np.ndarray,
    cfg: ModelConfig,
    attention_mask: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Position ids [3, B, T] (0 at padding) and rope deltas [B] for a batch.

    Images/videos are consumed in order across the batch, as in transformers. Padding may
    be on either side. Raises if a row's pad tokens do not match its grid.
    """
    input_ids = np.asarray(input_ids)
    b, t = input_ids.shape
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    types = token_types(input_ids, cfg)
    merge = cfg.vision.spatial_merge_size
    grids = {
        IMAGE: iter(np.zeros((0, 3)) if image_grid_thw is None else np.asarray(image_grid_thw)),
        VIDEO: iter(np.zeros((0, 3)) if video_grid_thw is None else np.asarray(video_grid_thw)),
    }
    seconds = iter([1.0] * 10**6 if second_per_grid_ts is None else list(second_per_grid_ts))
    positions = np.zeros((3, b, t), np.int64)
    deltas = np.zeros((b,), np.int64)
    for row in range(b):
        row_types = types[row][mask[row]]
        chunks, pos = [], 0
        for kind, group in itertools.groupby(row_types.tolist()):
            n = len(list(group))
            if kind == TEXT:
                chunks.append(np.broadcast_to(np.arange(n) + pos, (3, n)))
                pos += n
                continue
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"row {row}: more {'image' if kind == IMAGE else 'video'} pad runs than grids given")
            interval = cfg.vision.tokens_per_second * next(seconds) if kind == VIDEO else 1
            g = _grid_positions(pos, grid, merge, interval)
            if g.shape[1] != n:
                raise ValueError(f"row {row}: {n} pad tokens but grid {list(map(int, grid))} needs {g.shape[1]}")
            chunks.append(g)
            pos += max(int(grid[1]), int(grid[2])) // merge
        row_pos = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        positions[:, row, mask[row]] = row_pos
        deltas[row] = (row_pos.max() + 1 if row_pos.size else 0) - row_pos.shape[1]
    return positions, deltas


def mrope_cos_sin(positions: jnp.ndarray, head_dim: int, theta: float, section) -> tuple[jnp.ndarray, jnp.ndarray]:
    """positions [3, B, T] -> cos, sin [B, T, H] in fp32.

    Frequency j (of H/2) takes its position from axis 0, 1 or 2 by which `section` chunk
    holds j; the table is then duplicated for the rotate-half layout.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    axis_of = np.repeat(np.arange(3), section)  # [H/2]
    pos = positions.astype(jnp.float32)[axis_of]  # [H/2, B, T]
    freqs = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(pos_hw: jnp.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """pos_hw [L, 2] (row, column of each patch) -> cos, sin [L, H] in fp32.

    H/4 frequencies per axis: [h-freqs, w-freqs] duplicated for rotate-half.
    """
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # [H/4]
    freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # [L, 2, H/4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [L, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
