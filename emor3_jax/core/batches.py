"""Neutral types that data, sampling and RL all use, so no lower layer imports a higher one.

Letters: R rows, T tokens per row, L patch rows, C patch row width.

- `Prompt`: one tokenized prompt with its images' patch rows (what the sampler continues).
- `SequenceBatch`: model inputs of whole rows (prompt + response) for log-probs and gradients.
- `PackedBatch`: rows of different lengths packed into fixed-length sequences (segment ids),
  with the index that unpacks per-token values back to [rows, response].
- `prompt_images`: the images of a batch of prompts, each distinct one once.
- `bucket`: the padded length of a variable length, from a few configured sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One tokenized prompt. `pixel_values` [L, C] and `image_grid_thw` [I, 3] as the image
    processor returns them, for the images of this prompt in order (None: text only)."""

    ids: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None


@struct.dataclass
class SequenceBatch:
    input_ids: jax.Array  # [R, T]
    attention_mask: jax.Array  # [R, T]
    positions: jax.Array  # [3, R, T]
    pixels: jax.Array | None = None  # [L, C] in the model's vision order
    layout: Any = None  # the model family's vision layout (models.api.prepare_inputs makes it)
    # [R, T] packed rows: 1, 2, ... per row in a sequence, 0 on padding; attention stays inside
    # a segment. None: one row per sequence.
    segment_ids: jax.Array | None = None

    @classmethod
    def from_inputs(cls, inputs: dict) -> SequenceBatch:
        """`models.api.prepare_inputs` arrays -> SequenceBatch."""
        return cls(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["positions"],
            inputs.get("pixels"),
            inputs.get("layout"),
        )


@struct.dataclass
class PackedBatch:
    """Rows packed into P sequences of L tokens (rl/packing.py plans them).

    batch: the packs as a SequenceBatch [P, L] with segment ids; each row keeps its own
    positions and its images' features. scored [P, N]: the positions in each pack whose next
    token is a response token (the only ones whose logits are formed), 0 as filler. index
    [R, G]: for response token j of row r, its place p * N + k in the flattened scored list;
    0 past the row's response (masked out by the response mask).
    """

    batch: SequenceBatch
    scored: jax.Array
    index: jax.Array


def prompt_images(prompts: Sequence[Prompt]) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The images of `prompts` for `models.api.prepare_inputs`, each distinct image once.

    Prompts whose `pixel_values` is the same array hold the same images: the n rows of one
    prompt's samples, the reflections about it. Returns the distinct images' pixel rows [L, C]
    and grids [I, 3], and image_index [K]: the distinct image behind each of the K images the
    prompts show in reading order; (None, None, None) when no prompt has an image. The vision
    tower then encodes each image once however many rows show it.
    """
    first: dict[int, int] = {}  # id(pixel_values) -> index of its first image among the distinct ones
    pixels, grids, index, distinct = [], [], [], 0
    for p in prompts:
        if p.image_grid_thw is None:
            continue
        grid = np.asarray(p.image_grid_thw).reshape(-1, 3)
        if id(p.pixel_values) not in first:
            first[id(p.pixel_values)], distinct = distinct, distinct + len(grid)
            pixels.append(p.pixel_values)
            grids.append(grid)
        start = first[id(p.pixel_values)]
        index.extend(range(start, start + len(grid)))
    if not grids:
        return None, None, None
    return np.concatenate(pixels), np.concatenate(grids), np.asarray(index, np.int64)


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    """The smallest of `buckets` holding `n`; raises naming `what` when none does."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"{what} of {n} exceeds the largest bucket {max(buckets)}; add a larger bucket to the config")
