"""Time per GRPO step, split by phase, on the mid-size random Qwen2.5-VL (CPU, fp32).

The architecture of bench/forward.py (8 text layers of width 512, a 4-block vision tower)
with the 1000-token test tokenizer, 224x224 synthetic images, 4 prompts x 8 rollouts, the
reflective reward on. Runs the real trainer (`emor3_jax.trainer.run`) for a few GRPO steps
and reads the per-phase times it logs; the first step (compilation) is reported apart.

    python -m bench.grpo_step [--steps 4] [--response 64] [--small]

(--small: a 2-layer model of width 64, for the smoke test: measures nothing.)

Realistic lengths: the learner's half of a GRPO step (GRPOStep.experience's reference and
old log-probs, then GRPOStep.update) on the same rows, padded to prompt + generation buckets
against packed into sequences of --pack tokens (rl.packing). The tiny preset with random
weights (fp32, CPU, one device), 8 prompts (a 224x224 image, 128 tokens) x n=8, responses of
random tokens stopping at lengths drawn as bench/sampling.py draws them (log-normal, median at
limit / 6, 1% at the limit 512); a scripted sampler and task hand the step these rows, so the
two sides differ only in the packing. Prints the padding fraction of each side, the update's
tokens/s (real prompt + response tokens over the update's time) and `ratio packed_vs_padded`.

    python -m bench.grpo_step --lengths realistic [--prompts 8] [--n 8] [--new 512] [--micro 16] [--pack 640]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

PHASES = ("rollout_s", "reflection_s", "logprobs_s", "scoring_wait_s", "update_s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", choices=("forced", "realistic"), default="forced")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--small", action="store_true", help="--lengths forced: the smoke architecture (CI)")
    ap.add_argument("--prompts", type=int, default=8, help="--lengths realistic")
    ap.add_argument("--n", type=int, default=8, help="--lengths realistic")
    ap.add_argument("--new", type=int, default=512, help="--lengths realistic: the response limit")
    ap.add_argument("--micro", type=int, default=16, help="--lengths realistic: rows per micro-batch")
    ap.add_argument("--pack", type=int, default=0, help="--lengths realistic: pack length (0: prompt + limit)")
    ap.add_argument("--iters", type=int, default=2, help="--lengths realistic: timed runs per side (median)")
    args = ap.parse_args()
    if args.lengths == "realistic":
        lengths_main(args)
    else:
        trainer_main(args)


def trainer_main(args) -> None:
    from bench.common import hf_config, save_random_hf
    from configs.qwen_vl import get_config
    from emor3_jax import trainer
    from emor3_jax.data.tokenizers import build_test_tokenizer, special_token_ids

    root = tempfile.mkdtemp()
    tok = build_test_tokenizer(os.path.join(root, "tokenizer"))
    ids = special_token_ids(tok)
    special = (ids["<|image_pad|>"], ids["<|vision_start|>"], ids["<|vision_end|>"], ids["<|im_end|>"])
    cfg = hf_config(len(tok), *special, small=args.small)
    assert cfg.video_token_id == ids["<|video_pad|>"]  # Qwen's order: <|video_pad|> follows <|image_pad|>
    model_dir = os.path.join(root, "model")
    n_params = save_random_hf(model_dir, cfg)

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
    # The tiny config's buckets end at 4096 patches; the reflections send 32 rows of 256 patches.
    c.model.vision_buckets = tuple(16 * 2**k for k in range(10))
    c.sampling.prompt_buckets = (128, 384)
    c.rl.max_prompt_len = 384
    c.rl.pack_length = c.rl.max_prompt_len + args.response  # rl.packing (on) must hold the longest row
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


def lengths_main(args) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.common import make_mesh, prompts_for, realistic_lengths, tiny_fp32
    from configs.qwen_vl import get_config
    from emor3_jax.core import sharding
    from emor3_jax.core.batches import PackedBatch
    from emor3_jax.rl.experience import GRPOStep, StepSettings
    from emor3_jax.rl.learner import GRPOSettings, Learner, OptimizerSettings, make_optimizer
    from emor3_jax.sampling.methods import SamplingParams
    from emor3_jax.sampling.sampler import Samples

    mesh = make_mesh()
    model = tiny_fp32(mesh)
    cfg = model.cfg
    graphdef, params = nnx.split(model)
    ids = (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    prompts = prompts_for(args.prompts, (1, 16, 16), ids, np.random.default_rng(0))
    p_len, rows = len(prompts[0].ids), args.prompts * args.n
    lengths = realistic_lengths(rows, args.new, np.random.default_rng(1))
    tokens = np.random.default_rng(2).integers(1, cfg.image_token_id - 10, (rows, args.new)).astype(np.int32)

    class Scripted:
        """The sampler, encoder and task of the step: the drawn rows, a reward per row."""

        reflects, judge = False, "policy"

        def __init__(self, model_cfg):
            self.cfg = model_cfg

        def generate(self, model, prompts, *, key, max_new_tokens, n, params):
            zeros = jnp.zeros((rows, args.new))
            return Samples(jnp.asarray(tokens), zeros, jnp.asarray(lengths), jnp.ones((rows,), bool))

        def prompt(self, encoder, record):
            return prompts[record["i"]]

        def decode(self, tokens, lengths):
            return [str(n) for n in lengths]

        def score(self, response, label, text_answer, image_answer):
            return {"overall": float(response) / args.new}  # varies within a group: advantages != 0

    loss = GRPOSettings.from_config(get_config("3b"))  # the paper's loss settings
    base = StepSettings(
        num_generations=args.n,
        advantage="grpo",
        max_response_len=args.new,
        rollout=SamplingParams(temperature=1.0),
        micro_batch=args.micro,
        update_batch=args.prompts,
        recompute_old_logprobs=True,
        prompt_buckets=(p_len,),
        loss=loss,
        pack_length=args.pack or p_len + args.new,
    )
    records = [{"i": i, "label": "x"} for i in range(args.prompts)]
    real = int(sum(len(p.ids) for p in prompts) * args.n + lengths.sum())
    steps = {}
    for name, packing in (("padded", False), ("packed", True)):
        learner = Learner(graphdef, make_optimizer(OptimizerSettings.constant(1e-6))[0])
        s = Scripted(cfg)
        steps[name] = GRPOStep(
            learner=learner,
            sampler=s,
            encoder=s,
            task=s,
            settings=dataclasses.replace(base, packing=packing),
            pad_id=0,
            threads=1,
        )
    res = {name: dict(logprobs_s=[], update_s=[], update_cpu_s=[]) for name in steps}
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        # The sides alternate, so a change in the machine's load falls on both; run 0 compiles.
        for i in range(args.iters + 1):
            for name, step in steps.items():
                exp = step.experience(params, params, records, jax.random.key(0))
                p = jax.tree.map(jnp.copy, params)  # the update donates them
                opt = step.learner.init(p)
                t, cpu = time.perf_counter(), time.process_time()
                p, opt, metrics = step.update(p, opt, exp, step=1)
                jax.block_until_ready(p)
                r = res[name]
                if i:
                    r["logprobs_s"].append(exp.times["logprobs_s"])
                    r["update_s"].append(time.perf_counter() - t)
                    r["update_cpu_s"].append(time.process_time() - cpu)
                inner = [b.batch if isinstance(b, PackedBatch) else b for b, _ in exp.batches]
                r["slots"] = sum(int(np.prod(b.input_ids.shape)) for b in inner)
                r["shapes"] = sorted({tuple(b.input_ids.shape) for b in inner})
                r["loss"] = metrics["loss"]
    for name, step in steps.items():
        step.close()
        res[name] = {
            k: float(np.median(v)) if isinstance(v, list) and k.endswith("_s") else v for k, v in res[name].items()
        }
    print(
        f"tiny preset (random, fp32, CPU, 1 device), {args.prompts} prompts (224x224 image, {p_len} tokens) x "
        f"n={args.n} = {rows} rows, limit {args.new}, micro-batches of {args.micro} rows, one optimizer step"
    )
    print(
        f"lengths: log-normal, median {np.median(lengths):.0f}, mean {lengths.mean():.1f}, "
        f"{(lengths == args.new).mean():.1%} at the limit; {real} real tokens (prompt + response)"
    )
    for name, r in res.items():
        print(
            f"{name:7} padding {1 - real / r['slots']:6.1%} ({r['slots']} token slots; shapes {r['shapes']}); "
            f"ref + old log-probs {r['logprobs_s']:.2f} s; update {r['update_s']:.2f} s = "
            f"{real / r['update_s']:,.0f} tokens/s (CPU time {r['update_cpu_s']:.2f} s); loss {r['loss']:.6f}"
        )
    print(f"ratio packed_vs_padded: {res['padded']['update_s'] / res['packed']['update_s']:.2f}")
    print(f"ratio packed_vs_padded_logprobs: {res['padded']['logprobs_s'] / res['packed']['logprobs_s']:.2f}")


if __name__ == "__main__":
    main()
