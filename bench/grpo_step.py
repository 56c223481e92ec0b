"""Time per GRPO step, split by phase, on the mid-size random Qwen2.5-VL (CPU, fp32).

The architecture of bench/forward.py (8 text layers of width 512, a 4-block vision tower)
with the 1000-token test tokenizer, 224x224 synthetic images, 4 prompts x 8 rollouts, the
reflective reward on. Runs the real trainer (`emor3_jax.trainer.run`) for a few GRPO steps
and reads the per-phase times it logs; the first step (compilation) is reported apart.

    python bench/grpo_step.py [--steps 4] [--response 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import numpy as np  # noqa: E402

PHASES = ("rollout_s", "reflection_s", "logprobs_s", "scoring_wait_s", "update_s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--response", type=int, default=64)
    args = ap.parse_args()

    import torch
    from common import hf_config
    from transformers import Qwen2_5_VLForConditionalGeneration

    from configs.qwen_vl import get_config
    from emor3_jax import trainer
    from emor3_jax.data.tokenizers import build_test_tokenizer, special_token_ids

    root = tempfile.mkdtemp()
    tok = build_test_tokenizer(os.path.join(root, "tokenizer"))
    ids = special_token_ids(tok)
    cfg = hf_config(len(tok), ids["<|image_pad|>"], ids["<|vision_start|>"], ids["<|vision_end|>"], ids["<|im_end|>"])
    assert cfg.video_token_id == ids["<|video_pad|>"]  # Qwen's order: <|video_pad|> follows <|image_pad|>
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model_dir = os.path.join(root, "model")
    model.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    c = get_config("tiny")
    c.workdir = os.path.join(root, "run")
    c.hf_path, c.tokenizer_path = model_dir, os.path.join(root, "tokenizer")
    c.cold_start.steps = 0
    c.rl.steps = args.steps
    c.rl.rollout_batch, c.rl.update_batch, c.rl.micro_batch = 4, 4, 8
    c.rl.max_response_len = args.response
    c.sampling.gen_buckets = (32, args.response)
    c.data.image_size = 224
    c.data.min_pixels = c.data.max_pixels = 224 * 224
    c.sampling.prompt_buckets = (128, 384)
    c.rl.max_prompt_len = 384
    c.eval.every, c.eval.num_examples, c.eval.batch_size = 1000, 4, 4
    c.checkpoint.every = 1000
    c.data.synthetic_train, c.data.synthetic_test = 64, 8
    trainer.run(c)

    with open(os.path.join(c.workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"phase": "grpo"' in line]
    first, rest = rows[0], rows[1:]
    print(
        f"\nmodel {n_params / 1e6:.1f}M params; 4 prompts x 8 rollouts, <= {args.response} response tokens, "
        f"reflections <= {c.reward.reflection_max_tokens}; CPU fp32"
    )
    print("phase            first step (compiles)   later steps (median)")
    for p in PHASES:
        print(f"{p:<16} {first[p]:>10.2f} s {np.median([r[p] for r in rest]):>20.2f} s")
    total = [sum(r[p] for p in PHASES) for r in rest]
    print(f"{'total':<16} {sum(first[p] for p in PHASES):>10.2f} s {np.median(total):>20.2f} s")
    print(f"tokens/s (rollout tokens over step time): {np.median([r['tokens_per_s'] for r in rest]):.0f}")


if __name__ == "__main__":
    main()
