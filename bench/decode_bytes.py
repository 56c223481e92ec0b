"""HBM bytes one decode step reads per chip, by cache fill: the dense XLA decode (every cache
entry of every slot) against the ragged TPU kernel (only the blocks of each slot's live span,
counted from the kernel's own block map, `ragged_decode.live_blocks`), and the step time these
bytes project at each chip's HBM bandwidth (decode is bound by bytes: a projection, not a
measurement).

The run's settings of a variant (configs/qwen_vl.py): W decode slots over the chips (the cache's
batch axis is sharded over them), S = prompt bucket + generation bucket entries per slot, bf16
cache. At fill f every slot holds a prompt of f * S / 2 tokens (entries [P - f*S/2, P)) and as
many generated tokens. Weights read per step: the rollout weights each chip streams once per
step, as `--weights` says: fp32 fsdp-gathered training weights or a bf16 copy.

    python -m bench.decode_bytes [--variant 3b] [--chips 8] [--weights bf16]
"""

from __future__ import annotations

import argparse

import numpy as np

HBM = {"v5p": 2.765e12, "v6e": 1.64e12, "H100": 3.35e12}  # bytes/s per chip (vendor figures)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="3b", choices=("3b", "7b"))
    ap.add_argument("--chips", type=int, default=8)
    ap.add_argument("--weights", default="bf16", choices=("bf16", "fp32"))
    args = ap.parse_args()

    import jax

    from configs.qwen_vl import get_config
    from emor3_jax.dry_run import model_config
    from emor3_jax.models.api import abstract_model, cache_length
    from emor3_jax.models.qwen25_vl.ragged_decode import bytes_read, tpu_block
    from emor3_jax.sampling.sampler import bucket

    c = get_config(args.variant)
    cfg = model_config(c)
    t = cfg.text
    p = bucket(c.rl.max_prompt_len, c.sampling.prompt_buckets, "rl.max_prompt_len")
    s = cache_length("splash", p + bucket(c.rl.max_response_len, c.sampling.gen_buckets, "rl.max_response_len"))
    w = c.sampling.max_rows // args.chips  # slots per chip
    block = tpu_block(s, None)
    params = sum(x.size for x in jax.tree.leaves(abstract_model(cfg)))
    weights = params * (2 if args.weights == "bf16" else 4)
    kv = dict(kv_heads=t.num_kv_heads, head_dim=t.head_dim, itemsize=2)
    print(
        f"{args.variant}: {args.chips} chips, {w} slots per chip, S={s}, block {block}, {t.num_layers} layers, "
        f"weights {weights / 2**30:.2f} GiB ({args.weights})"
    )
    print("fill  dense_kv_GiB  ragged_kv_GiB  ratio  " + "  ".join(f"{k}_ms(dense/ragged)" for k in HBM))
    for fill in (0.25, 0.5, 1.0):
        half = int(fill * s) // 2
        start, end = np.full(w, p - half), np.full(w, min(p + half, s))
        if fill == 1.0:
            start, end = np.zeros(w, int), np.full(w, s)
        dense = w * t.num_layers * 2 * t.num_kv_heads * s * t.head_dim * 2
        ragged = t.num_layers * bytes_read(start, end, s, block, **kv)
        times = "  ".join(
            f"{(weights + dense) / bw * 1e3:.1f}/{(weights + ragged) / bw * 1e3:.1f}" for bw in HBM.values()
        )
        print(f"{fill:4.2f}  {dense / 2**30:12.2f}  {ragged / 2**30:13.2f}  {ragged / dense:5.2f}  {times}")
        print(f"ratio decode_bytes_{args.variant}_fill{int(fill * 100)}: {dense / ragged:.2f}")


if __name__ == "__main__":
    main()
