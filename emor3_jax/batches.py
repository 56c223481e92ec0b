"""Neutral types that data, sampling and RL all use, so no lower layer imports a higher one.

Letters: R rows, T tokens per row, L patch rows, C patch row width.

- `Prompt`: one tokenized prompt with its images' patch rows (what the sampler continues).
- `SequenceBatch`: model inputs of whole rows (prompt + response) for log-probs and gradients.
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


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    """The smallest of `buckets` holding `n`; raises naming `what` when none does."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"{what} of {n} exceeds the largest bucket {max(buckets)}; add a larger bucket to the config")
