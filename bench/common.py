"""Shared by the CPU benchmarks: the mid-size random Qwen2.5-VL and a timer."""

from __future__ import annotations

import time

import numpy as np
from transformers import Qwen2_5_VLConfig

VOCAB, IMAGE, VSTART, VEND = 48000, 47990, 47992, 47993


def hf_config(
    vocab: int = VOCAB, image: int = IMAGE, vstart: int = VSTART, vend: int = VEND, eos: int = 0
) -> Qwen2_5_VLConfig:
    """The mid-size architecture; token ids default to the ones bench/forward.py uses."""
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
