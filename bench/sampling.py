"""Rollout sampling throughput: our on-device sampler vs transformers' generate.

CPU mode (default): the mid-size random Qwen2.5-VL of bench/forward.py, 16 prompts with one
224x224 image, n=8 samples each at temperature 1.0, 128 new tokens forced (no stop token),
fp32. Each side runs in its own subprocess, back to back, on the same saved weights, so
peak memory (max RSS) is each side's own and torch's spinning threads cannot slow XLA.
Also times our sampler with prefill once + fork against prefilling every copy.

    python -m bench.sampling [--prompts 16] [--n 8] [--new 128] [--small]

(--small: a 2-layer model of width 64, for the smoke test: measures nothing.)

Realistic lengths (CPU): the tiny preset with random weights, 64 prompts x n=8 with a 224x224 image,
limit 256; each row stops at a length drawn from a log-normal (median 256 / 6, 1% of rows at
the limit; the same lengths for both sides, as per-row limits). Continuous batching against
the static path (chunks of max_rows rows, each decoded until its longest row stops), both with
the same 32 decode slots, i.e. the same KV cache:

    python -m bench.sampling --lengths realistic [--prompts 64] [--n 8] [--new 256] [--slots 32]

--page_size N adds a third arm, continuous with a paged cache (pages of N entries, a pool of
--kv_pages pages; 0: as many as no row ever waits for): speed and entries held against the
contiguous cache.

GPU mode: Qwen2.5-VL-3B shapes with random bf16 weights, 32 prompts x 8 samples (256 rows)
with a 448x448 image, 512 new tokens; tokens/s and the fraction of HBM bandwidth the decode
steps use (bytes of weights + KV cache read per step over the step time).

    python -m bench.sampling --gpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.common import IMAGE, VEND, VSTART, load_fp32, make_mesh, prompts_for, realistic_lengths  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HBM_PEAK = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM parts


def run_ours(path: str, args) -> dict:
    import jax

    from emor3_jax.sampling.methods import SamplingParams
    from emor3_jax.sampling.sampler import Sampler

    model = load_fp32(path, make_mesh())
    prompts = prompts_for(args.prompts, (1, 16, 16), (IMAGE, VSTART, VEND), np.random.default_rng(0))
    params = SamplingParams(temperature=1.0)
    res = {}
    for name, batch, n in (("fork", prompts, args.n), ("prefill_each", [p for p in prompts for _ in range(args.n)], 1)):
        s = Sampler(model.cfg, prompt_buckets=(128,), gen_buckets=(args.new,), pad_id=0)
        t0 = time.perf_counter()
        out = s.generate(model, batch, key=jax.random.key(0), max_new_tokens=args.new, n=n, params=params)
        jax.block_until_ready(out.tokens)
        first = time.perf_counter() - t0  # compile + one run
        walls = []
        for i in range(args.iters):
            t0 = time.perf_counter()
            out = s.generate(model, batch, key=jax.random.key(i + 1), max_new_tokens=args.new, n=n, params=params)
            jax.block_until_ready(out.tokens)
            walls.append(time.perf_counter() - t0)
        lengths = np.asarray(out.lengths)
        assert (lengths == args.new).all(), "every row must run the full length"
        wall = float(np.median(walls))
        res[name] = dict(
            seconds=wall, tokens=int(lengths.sum()), compile_s=first - wall, programs=s.compiled_programs()
        )
    res["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return res


def run_transformers(path: str, args) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    prompts = prompts_for(args.prompts, (1, 16, 16), (IMAGE, VSTART, VEND), np.random.default_rng(0))
    ids = torch.tensor(np.stack([p.ids for p in prompts]))
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == IMAGE).long(),
        pixel_values=torch.tensor(np.concatenate([p.pixel_values for p in prompts])),
        image_grid_thw=torch.tensor(np.concatenate([p.image_grid_thw for p in prompts])),
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_return_sequences=args.n,
        max_new_tokens=args.new,
        min_new_tokens=args.new,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        model.generate(**{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        t0 = time.perf_counter()
        out = model.generate(**kw)
        wall = time.perf_counter() - t0
    new = out[:, ids.shape[1] :]
    assert new.shape[1] == args.new
    return dict(
        seconds=wall, tokens=int(new.numel()), max_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )


def lengths_main(args) -> None:
    import jax

    from bench.common import tiny_fp32
    from emor3_jax.sampling.methods import SamplingParams
    from emor3_jax.sampling.sampler import Sampler

    # The tiny preset (random weights): a decode step is cheap, so the comparison measures the
    # scheduling, not the matmuls.
    model = tiny_fp32(make_mesh())
    cfg = model.cfg
    ids = (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    prompts = prompts_for(args.prompts, (1, 16, 16), ids, np.random.default_rng(0))
    rows = args.prompts * args.n
    lengths = realistic_lengths(rows, args.new, np.random.default_rng(1))
    kw = dict(max_new_tokens=args.new, n=args.n, params=SamplingParams(temperature=1.0), row_max_new=lengths)
    res = {}
    arms = [("static", False, 0, 0), ("continuous", True, 0, 0)]
    if args.page_size:
        arms.append(("paged", True, args.page_size, args.kv_pages))
    for name, continuous, page_size, kv_pages in arms:
        s = Sampler(
            model.cfg,
            prompt_buckets=(128,),
            gen_buckets=(args.new,),
            pad_id=0,
            max_rows=args.slots,
            continuous=continuous,
            page_size=page_size,
            kv_pages=kv_pages,
        )
        jax.block_until_ready(s.generate(model, prompts, key=jax.random.key(0), **kw).tokens)  # compile
        walls = []
        for i in range(args.iters):
            t0 = time.perf_counter()
            out = s.generate(model, prompts, key=jax.random.key(i + 1), **kw)
            jax.block_until_ready(out.tokens)
            walls.append(time.perf_counter() - t0)
        np.testing.assert_array_equal(np.asarray(out.lengths), lengths)  # every row stopped at its drawn length
        cache_rows, entries = s.last_cache
        lay = s.layout(args.prompts, 128, args.n, args.new)
        res[name] = dict(
            seconds=float(np.median(walls)),
            steps=int(s.last_schedule.steps),
            cache=(cache_rows, entries),
            # entries the cache holds (a paged pool: its pages and each shard's spare)
            held=(lay.pages + 1) * lay.page if lay.page else cache_rows * entries,
            programs=s.compiled_programs(),
        )
    st, co = res["static"], res["continuous"]
    tokens = int(lengths.sum())
    print(
        f"tiny-width model, {args.prompts} prompts (224x224 image, 128-token prompt) x n={args.n} = {rows} rows, "
        f"limit {args.new}, T=1.0, fp32, CPU, {args.slots} slots"
    )
    print(
        f"lengths: log-normal, median {np.median(lengths):.0f}, mean {lengths.mean():.1f}, "
        f"{(lengths == args.new).mean():.1%} at the limit, {tokens} tokens"
    )
    names = {"static": "static (chunks)", "continuous": "continuous", "paged": f"paged ({args.page_size})"}
    for name, r in res.items():
        print(
            f"{names[name]:16} {tokens / r['seconds']:8,.0f} tok/s ({r['seconds']:.2f} s, {r['steps']} decode steps, "
            f"KV cache {r['cache'][0]} rows x {r['cache'][1]} entries, {r['held']:,} entries held, "
            f"{r['programs']} programs)"
        )
    print(f"ideal steps (tokens / slots): {tokens / args.slots:.0f}")
    print(f"ratio continuous_vs_static: {st['seconds'] / co['seconds']:.2f}")
    if "paged" in res:
        pg = res["paged"]
        # A row reserves pages for its limit; here each row's limit is its drawn length.
        print("paged: each row's limit is its drawn length, so a row reserves the pages it uses")
        print(f"ratio paged_vs_contiguous: {co['seconds'] / pg['seconds']:.2f}")
        print(f"ratio kv_entries_contiguous_over_paged: {co['held'] / pg['held']:.2f}")


def cpu_main(args) -> None:
    from bench.common import hf_config, save_random_hf

    path = tempfile.mkdtemp()
    n_params = save_random_hf(path, hf_config(small=args.small))
    results = {}
    for side in ("ours", "transformers"):
        cmd = [
            sys.executable,
            "-m",
            "bench.sampling",
            "--side",
            side,
            "--path",
            path,
            "--prompts",
            str(args.prompts),
            "--n",
            str(args.n),
            "--new",
            str(args.new),
            "--iters",
            str(args.iters),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    ours, ref = results["ours"], results["transformers"]
    fork, each = ours["fork"], ours["prefill_each"]
    tps = lambda r: r["tokens"] / r["seconds"]
    print(
        f"model {n_params / 1e6:.1f}M params, {args.prompts} prompts (224x224 image, 128-token prompt) x n={args.n}, "
        f"{args.new} new tokens forced, T=1.0, fp32, CPU"
    )
    print(
        f"ours (prefill once + fork): {tps(fork):,.0f} tok/s ({fork['seconds']:.2f} s for {fork['tokens']} tokens; "
        f"compile {fork['compile_s']:.1f} s, {fork['programs']} programs)"
    )
    print(
        f"ours (prefill every copy):  {tps(each):,.0f} tok/s ({each['seconds']:.2f} s; "
        f"compile {each['compile_s']:.1f} s)"
    )
    print(f"transformers generate:      {tps(ref):,.0f} tok/s ({ref['seconds']:.2f} s for {ref['tokens']} tokens)")
    print(
        f"peak memory (max RSS of each process): ours {ours['max_rss_gb']:.2f} GB, "
        f"transformers {ref['max_rss_gb']:.2f} GB"
    )
    print(f"ratio sampling_vs_transformers: {tps(fork) / tps(ref):.2f}")
    print(f"ratio fork_vs_prefill_each: {each['seconds'] / fork['seconds']:.2f}")


def gpu_main(args) -> None:
    import jax
    import jax.numpy as jnp

    from emor3_jax.core import sharding
    from emor3_jax.models.api import create_model, preset
    from emor3_jax.sampling.methods import SamplingParams
    from emor3_jax.sampling.sampler import Sampler

    runtime = dict(param_dtype="bfloat16", compute_dtype="bfloat16", attention_impl=args.attention)
    # --smoke: the tiny preset (with the 3B vocabulary), to check this path on a CPU
    cfg = preset("tiny", vocab_size=preset("3b").text.vocab_size, **runtime) if args.smoke else preset("3b", **runtime)
    mesh = make_mesh(None)
    t0 = time.perf_counter()
    model = create_model(cfg, mesh, sharding.DEFAULT_RULES)
    print(
        f"{jax.devices()[0].device_kind}: random {'tiny' if args.smoke else '3B-shaped'} model "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    grid = (1, 32, 32)  # 448x448
    prompts = prompts_for(
        args.prompts,
        grid,
        (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id),
        np.random.default_rng(0),
    )
    p_len = len(prompts[0].ids)
    s = Sampler(cfg, prompt_buckets=(p_len,), gen_buckets=(args.new,), pad_id=0)
    params = SamplingParams(temperature=1.0)
    t0 = time.perf_counter()
    jax.block_until_ready(
        s.generate(model, prompts, key=jax.random.key(0), max_new_tokens=args.new, n=args.n, params=params).tokens
    )
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = s.generate(model, prompts, key=jax.random.key(1), max_new_tokens=args.new, n=args.n, params=params)
    jax.block_until_ready(out.tokens)
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()  # prefill + one step, same programs (max_new_tokens is not static)
    jax.block_until_ready(
        s.generate(model, prompts, key=jax.random.key(2), max_new_tokens=1, n=args.n, params=params).tokens
    )
    one = time.perf_counter() - t0
    rows = args.prompts * args.n
    tokens = int(np.asarray(out.lengths).sum())
    t = cfg.text
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx_state(model)))
    kv_row_slot = 2 * t.num_layers * t.num_kv_heads * t.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
    # Each step reads the text weights and the whole cache buffer (masked slots included).
    text_bytes = param_bytes - sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx_state(model.visual)))
    step_bytes = text_bytes + rows * (p_len + args.new) * kv_row_slot
    step_s = (wall - one) / (args.new - 1)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in HBM_PEAK.items() if k in kind), None)
    stats = jax.devices()[0].memory_stats() or {}
    print(
        f"{rows} rows x {args.new} new tokens (prompt {p_len} with a 448x448 image), bf16, attention={args.attention}"
    )
    print(
        f"tokens/s {tokens / wall:,.0f} ({wall:.2f} s, of which prefill + first step {one:.2f} s; "
        f"first call incl. compile {first:.1f} s; {s.compiled_programs()} programs)"
    )
    print(
        f"decode step {step_s * 1e3:.2f} ms reading {step_bytes / 1e9:.2f} GB -> {step_bytes / step_s / 1e12:.2f} TB/s"
        + (f" = {step_bytes / step_s / peak:.0%} of {kind} HBM peak {peak / 1e12:.2f} TB/s" if peak else "")
    )
    print(f"peak HBM in use: {stats.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB")


def nnx_state(module):
    from flax import nnx

    return nnx.state(module, nnx.Param)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument(
        "--lengths", choices=("forced", "realistic"), default="forced", help="CPU: realistic = drawn per row"
    )
    ap.add_argument("--slots", type=int, default=32, help="--lengths realistic: decode slots (max_rows)")
    ap.add_argument("--page_size", type=int, default=0, help="--lengths realistic: also a paged cache of these pages")
    ap.add_argument("--kv_pages", type=int, default=0, help="--lengths realistic: the paged pool (0: no row waits)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new", type=int, default=None)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--attention", default="xla", help="GPU mode: xla | cudnn | einsum | flash")
    ap.add_argument("--smoke", action="store_true", help="GPU mode with tiny shapes (runs on CPU)")
    ap.add_argument("--small", action="store_true", help="CPU mode: the smoke architecture (CI)")
    ap.add_argument("--side", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        run = run_ours if args.side == "ours" else run_transformers
        print(json.dumps(run(args.path, args)))
    elif args.lengths == "realistic":
        args.prompts, args.new = args.prompts or 64, args.new or 256
        lengths_main(args)
    elif args.gpu or args.smoke:
        args.prompts, args.new = args.prompts or (2 if args.smoke else 32), args.new or (8 if args.smoke else 512)
        gpu_main(args)
    else:
        args.prompts, args.new = args.prompts or 16, args.new or 128
        cpu_main(args)


if __name__ == "__main__":
    main()
