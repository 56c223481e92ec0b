"""Shared by the benchmarks: the one-device mesh, the mid-size random Qwen2.5-VL (and a small one
for smoke runs), the tiny preset, prompts with an image, the realistic response lengths, and a
timer. Imports of jax, torch and the package are inside the functions: the TRL-side scripts and
the JAX-only benches import this module without them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import Qwen2_5_VLConfig

VOCAB, IMAGE, VSTART, VEND = 48000, 47990, 47992, 47993
PROMPT_TEXT = 62  # text tokens around the image: prompt = 62 + 64 image + 2 = 128 tokens (16x16 grid)


# The mid-size architecture (~100M parameters with VOCAB) and a small one for smoke runs (--small:
# the same code paths in seconds; its figures measure nothing).
MID_TEXT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, mrope=[8, 12, 12])
MID_VISION = dict(depth=4, hidden_size=512, intermediate_size=1368, num_heads=8, fullatt_block_indexes=[3])
SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, mrope=[2, 3, 3])
SMALL_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1])


def make_mesh(devices: int | None = 1):
    """The benches' mesh: data 1, fsdp over the first `devices` devices (None: all), tensor 1."""
    import jax

    from emor3_jax.core import sharding

    chosen = jax.devices()[:devices] if devices else None
    return sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], chosen)


def hf_config(
    vocab: int = VOCAB, image: int = IMAGE, vstart: int = VSTART, vend: int = VEND, eos: int = 0, small: bool = False
) -> Qwen2_5_VLConfig:
    """The mid-size architecture (`small`: the smoke one); token ids default to the ones
    bench/forward.py uses."""
    from transformers import Qwen2_5_VLConfig  # here: the JAX-only benches never import torch

    text, vision = (SMALL_TEXT, SMALL_VISION) if small else (MID_TEXT, MID_VISION)
    text = dict(
        vocab_size=vocab,
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=eos,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": text["mrope"]},
    )
    vision = dict(
        depth=vision["depth"],
        hidden_size=vision["hidden_size"],
        intermediate_size=vision["intermediate_size"],
        num_heads=vision["num_heads"],
        out_hidden_size=text["hidden_size"],
        fullatt_block_indexes=vision["fullatt_block_indexes"],
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


def random_hf(cfg: Qwen2_5_VLConfig, seed: int = 0):
    """transformers' Qwen2.5-VL with random weights drawn after torch.manual_seed(seed)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def save_random_hf(path: str, cfg: Qwen2_5_VLConfig, seed: int = 0) -> int:
    """Saves random_hf(cfg, seed) to `path` (save_pretrained); returns its parameter count."""
    model = random_hf(cfg, seed)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def load_fp32(path: str, mesh):
    """Our model from the HF checkpoint at `path`, fp32 parameters and compute, on `mesh`."""
    from emor3_jax.core import sharding
    from emor3_jax.models.api import load_hf

    return load_hf(path, mesh, sharding.DEFAULT_RULES, param_dtype="float32", compute_dtype="float32")


def tiny_fp32(mesh):
    """The tiny preset (vocabulary 8192) with random weights (seed 0), fp32, on `mesh`."""
    from emor3_jax.core import sharding
    from emor3_jax.models.api import create_model, preset

    cfg = preset("tiny", vocab_size=8192, param_dtype="float32", compute_dtype="float32")
    return create_model(cfg, mesh, sharding.DEFAULT_RULES, seed=0)


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
