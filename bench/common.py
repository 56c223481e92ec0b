"""Shared by the CPU benchmarks: the mid-size random Qwen2.5-VL, prompts with an image, the
realistic response lengths, and a timer."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import Qwen2_5_VLConfig

VOCAB, IMAGE, VSTART, VEND = 48000, 47990, 47992, 47993
PROMPT_TEXT = 62  # text tokens around the image: prompt = 62 + 64 image + 2 = 128 tokens (16x16 grid)


def hf_config(
    vocab: int = VOCAB, image: int = IMAGE, vstart: int = VSTART, vend: int = VEND, eos: int = 0
) -> Qwen2_5_VLConfig:
    """The mid-size architecture; token ids default to the ones bench/forward.py uses."""
    from transformers import Qwen2_5_VLConfig  # here: the JAX-only benches never import torch

    text = dict(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=eos,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
    )
    vision = dict(
        depth=4,
        hidden_size=512,
        intermediate_size=1368,
        num_heads=8,
        out_hidden_size=512,
        fullatt_block_indexes=[3],
        window_size=112,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=image + 1,
        vision_start_token_id=vstart,
        vision_end_token_id=vend,
    )


def timeit(fn, iters: int) -> tuple[float, float]:
    """Median wall seconds per call, and CPU/wall ratio over all calls."""
    walls, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    return float(np.median(walls)), (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def prompts_for(count: int, grid: tuple[int, int, int], vocab_image: tuple[int, int, int], rng):
    """`count` prompts: PROMPT_TEXT random text tokens around one image of `grid` (random pixels);
    vocab_image = (image pad, vision start, vision end) ids."""
    from emor3_jax.core.batches import Prompt

    image, vstart, vend = vocab_image
    n_img = grid[1] * grid[2] // 4
    out = []
    for _ in range(count):
        ids = np.concatenate(
            [
                rng.integers(1, image - 10, PROMPT_TEXT // 2),
                [vstart],
                [image] * n_img,
                [vend],
                rng.integers(1, image - 10, PROMPT_TEXT - PROMPT_TEXT // 2),
            ]
        )
        pixels = rng.standard_normal((grid[1] * grid[2], 3 * 2 * 14 * 14)).astype(np.float32)
        out.append(Prompt(ids, pixels, np.array([grid])))
    return out


def realistic_lengths(rows: int, limit: int, rng) -> np.ndarray:
    """Response lengths [rows]: log-normal with the median at limit / 6 and 1% of rows at or past
    the limit (sigma = ln 6 / z_0.99), rounded and clipped to 1..limit."""
    sigma = np.log(6.0) / 2.3263478740408408  # z_0.99
    drawn = np.exp(np.log(limit / 6) + sigma * rng.standard_normal(rows))
    return np.clip(np.round(drawn), 1, limit).astype(np.int32)
