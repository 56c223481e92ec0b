"""Tiny random transformers Qwen2.5-VL models and batches for parity tests.

Sizes are distinct (a swapped axis fails instead of broadcasting) and divisible by the
8-device meshes the sharding tests use.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

VOCAB = 400
IMAGE, VIDEO, VSTART, VEND = 390, 391, 392, 393
PATCH_DIM = 3 * 2 * 14 * 14


def hf_config(tie: bool = False, **text_overrides) -> Qwen2_5_VLConfig:
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=VEND + 1,
        **text_overrides,
    )
    vision = dict(
        depth=3,
        hidden_size=40,
        intermediate_size=56,
        num_heads=2,
        out_hidden_size=64,
        fullatt_block_indexes=[1],
        window_size=112,
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
        tie_word_embeddings=tie,
    )


def hf_model(seed: int = 0, tie: bool = False) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = hf_config(tie=tie)
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms and biases, so a mixed-up one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def make_batch(rows, rng: np.random.Generator, pad_side: str = "left", length: int = 0):
    """rows: list of segment lists; a segment is an int (that many text tokens) or
    ("image", h, w) in patches. Returns a dict like a processor's output (numpy), padded to
    `length` tokens (0: the longest row)."""
    seqs, grids, pixels = [], [], []
    for segs in rows:
        ids = []
        for s in segs:
            if isinstance(s, int):
                ids += rng.integers(0, IMAGE - 10, size=s).tolist()
            else:
                _, h, w = s
                grids.append([1, h, w])
                pixels.append(rng.standard_normal((h * w, PATCH_DIM)).astype(np.float32))
                ids += [VSTART] + [IMAGE] * (h * w // 4) + [VEND]
        seqs.append(ids)
    t = max(length, *map(len, seqs))
    input_ids = np.zeros((len(seqs), t), np.int64)
    mask = np.zeros((len(seqs), t), np.int64)
    for i, ids in enumerate(seqs):
        sl = slice(t - len(ids), t) if pad_side == "left" else slice(0, len(ids))
        input_ids[i, sl] = ids
        mask[i, sl] = 1
    out = dict(input_ids=input_ids, attention_mask=mask)
    if grids:
        out["image_grid_thw"] = np.array(grids, np.int64)
        out["pixel_values"] = np.concatenate(pixels)
    return out


def hf_forward(model, batch, output_hidden_states=False):
    """transformers' logits with M-RoPE really in use (mm_token_type_ids, explicit positions)."""
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    tt = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    grid = torch.tensor(batch["image_grid_thw"]) if "image_grid_thw" in batch else None
    pos, deltas = model.model.get_rope_index(ids, image_grid_thw=grid, attention_mask=mask, mm_token_type_ids=tt)
    kw = {}
    if grid is not None:
        kw = dict(pixel_values=torch.tensor(batch["pixel_values"]), image_grid_thw=grid)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, mm_token_type_ids=tt, **kw)
    return out.logits.numpy(), pos.numpy(), deltas.numpy()


# Inputs every parity test runs: name -> (rows, pad side)
CASES = {
    "text_only": ([[13]], "left"),
    "padded_text": ([[13], [7], [10]], "left"),
    "one_image": ([[5, ("image", 8, 12), 6]], "left"),
    "two_images_sizes": ([[3, ("image", 12, 20), ("image", 8, 8), 4]], "left"),
    "text_around_images": ([[4, ("image", 8, 12), 5, ("image", 6, 10), 3]], "right"),
    "mixed_batch": ([[6, ("image", 8, 12), 4], [9], [2, ("image", 10, 6), 3, ("image", 4, 4)]], "left"),
}
