"""One GRPO step at Qwen2.5-VL-3B shapes on one GPU: sampling, update, log-probs, MFU, HBM.

Random weights (no download), bf16 compute, the real Sampler and Learner. Shapes:
32 prompts x n=8 samples = 256 rows; each prompt is 318 text tokens around one 448x448 image
(32x32 patches -> 256 merged tokens, + vision start/end), so P = 576 prompt tokens; every row
samples exactly 512 new tokens (no stop token, T=1.0), the prefill runs once per prompt and is
forked 8 ways. Training rows are prompt + response, T = 1088 tokens, in micro-batches of
`--micro` rows (gradients accumulated, one AdamW step over all 256 rows).

    python -m bench.gpu_grpo [--out gpu_grpo.json]     # GPU: ~5-7 min including compilation
    python -m bench.gpu_grpo --smoke                   # tiny shapes on CPU (CI keeps it working)

Phases, in this order (the update before the log-probs: it carries the MFU figure), each
timed on a second call so compilation is reported apart (compile_s = first call - later call):
  sampling       Sampler.generate, prefill + 512 decode steps; tokens = generated tokens.
  update         GRPOStep.update (rl/experience.py): Learner.grpo_grads on every micro-batch
                 (forward + backward of the policy, with remat) + Learner.apply (clip + AdamW);
                 tokens = prompt + response tokens.
  ref_logprobs   Learner.logprobs over the same rows (forward only; the reference policy).
  grpo_step      sampling + ref_logprobs + update (old log-probs come from the sampler, as with
                 rl.recompute_old_logprobs=False; host-side reward scoring is not included).

tokens/s: the tokens of the phase (above) over its run time. The whole step's tokens/s is
EasyR1's `perf/throughput`: prompt + response tokens of the batch (its attention-mask sum) over
the step time, per GPU; `ratio tokens_per_gpu_vs_easyr1` compares it with EasyR1's published
~1,800 tokens/s/GPU for Qwen2.5-VL-3B on 8xH100.

MFU = model FLOPs / (run time x peak bf16 dense FLOP/s of the device, table PEAK_BF16), with
EasyR1's (verl's) FlopsCounter formula for the language model, so `ratio mfu_vs_easyr1` (over
EasyR1's ~8% `perf/mfu_actor`) compares like with like:
  FLOPs = 6 * N * tokens + 12 * sum_rows(T^2) * H * heads * L          (forward + backward)
  N     = L * (3 * D * F + D * (q + k + v + o widths)) + 2 * V * D    (embedding counted as
          EasyR1 does, as if it were a matmul)
and a third of that for the forward-only log-probs. The vision tower is NOT counted in `mfu`
(EasyR1 does not count it either); `mfu_with_vision` adds its 6 * N_vision * patches + window /
full attention terms (the tower is trained: ~15% of the update's FLOPs at these shapes). Remat
recomputes the decoder's forward in the backward pass; that work is not counted (model FLOPs).

Memory choice (fits an 80 GB H100): bf16 parameters (param_dtype=bfloat16), hence bf16
gradients and AdamW moments: for the 3.75B parameters, params 7.5 GB + moments 15 GB +
accumulated and per-micro-batch gradients 15 GB = 37.5 GB. fp32 parameters would need
15 + 30 + 30 = 75 GB before any activation, more than an H100 holds (EasyR1 shards that state
over 8 GPUs with FSDP); timing is the same either way, bf16 moments are a benchmark shortcut,
not a training recipe. The reference policy shares the policy's weights (random either way; a
real run holds one more copy, +7.5 GB). Remat is on for the decoder layers and the vision
blocks (without it the tower kept every block's activations, ~2.5-3 GB per 448x448 image by
hand count). Measured on an H200 with `--micro 8`: 41 GiB peak and 21.3 s per update with the
tower's remat, 56 GiB and 19.6 s without; `--micro 4` without it peaked at 46 GiB.
Default `--micro 4` (4 x 1088 = 4352 tokens per matmul); on RESOURCE_EXHAUSTED the update halves
the micro-batch and recompiles. `--param-dtype float32` is for an H200.

Peak HBM is the device allocator's `peak_bytes_in_use`, cumulative since start, read after
each phase (n/a on CPU). Results print as each phase ends (flushed) and `--out` is rewritten
after each phase, so a timeout still leaves numbers. No phase starts compiling after `--budget`
seconds (default 390); a compiled phase's timed call may start up to GRACE (90) s later, so the
run ends within ~9.5 min at worst and ~5-7 min as expected.
The GPU path imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.93")  # the default 0.75 caps an H100 at ~58 GiB

import numpy as np  # noqa: E402

from bench.common import make_mesh  # noqa: E402

EASYR1 = {"tokens_per_gpu": 1800.0, "mfu": 0.08}  # Qwen2.5-VL-3B GRPO, 8xH100, published figures
GRACE = 90.0  # seconds past --budget that an already compiled phase may still take for its timed call
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # dense FLOP/s
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def make_prompts(cfg, count: int, text_len: int, image: int, rng) -> list:
    """`count` prompts: text_len random text tokens around one image of image x image pixels."""
    from emor3_jax.core.batches import Prompt

    side = image // cfg.vision.patch_size
    grid = np.array([[1, side, side]])
    n_img = side * side // cfg.vision.merge_unit
    out = []
    for _ in range(count):
        ids = np.concatenate(
            [
                rng.integers(1, cfg.vision_start_token_id - 10, text_len // 2),
                [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id],
                rng.integers(1, cfg.vision_start_token_id - 10, text_len - text_len // 2),
            ]
        )
        out.append(Prompt(ids, rng.standard_normal((side * side, cfg.vision.patch_dim)).astype(np.float32), grid))
    return out


# ---------------------------------------------------------------- FLOPs


def text_flops(cfg, seqlens, train: bool) -> float:
    """EasyR1/verl FlopsCounter for Qwen2 (see the module docstring); forward only: a third."""
    t = cfg.text
    h = t.head_dim
    per_layer = 3 * t.hidden_size * t.intermediate_size + t.hidden_size * h * (2 * t.num_heads + 2 * t.num_kv_heads)
    n = per_layer * t.num_layers + 2 * t.vocab_size * t.hidden_size
    seqlens = np.asarray(seqlens, np.float64)
    total = 6 * n * seqlens.sum() + 12 * (seqlens**2).sum() * h * t.num_heads * t.num_layers
    return float(total if train else total / 3)


def vision_flops(cfg, grid, images: int, train: bool) -> float:
    """Vision tower FLOPs for `images` images of grid (t, h, w) patches, same conventions."""
    v = cfg.vision
    t, hh, ww = grid
    e, f, patches = v.hidden_size, v.intermediate_size, t * hh * ww
    n_patch = v.depth * (4 * e * e + 3 * e * f) + v.patch_dim * e  # per patch
    n_merged = (v.merge_unit * e) ** 2 + v.merge_unit * e * v.out_hidden_size  # per merged token
    dense = 2 * (patches * n_patch + patches // v.merge_unit * n_merged)
    win = v.window_size // v.patch_size  # window side in patches
    sq = lambda side: sum(min(win, side - i) ** 2 for i in range(0, side, win))
    full = len(v.fullatt_block_indexes)
    attn = 4 * e * t * ((v.depth - full) * sq(hh) * sq(ww) + full * (hh * ww) ** 2)
    return float(images * (dense + attn) * (3 if train else 1))


def peak_flops(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16 if k in kind), None)


def peak_hbm() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


# ---------------------------------------------------------------- rows


def training_batches(cfg, prompts, n: int, tokens: np.ndarray, micro: int) -> list:
    """Prompt + sampled response for every row, as device SequenceBatches of `micro` rows, built
    by the GRPO step's own row builder (rl/rows.training_rows)."""
    import jax

    from emor3_jax.rl.rows import training_rows
    from emor3_jax.sampling.rollout import Rollouts

    special = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    tokens = np.where(np.isin(tokens, special), 1, tokens)  # random weights sample them too
    lengths = np.full((len(tokens),), tokens.shape[1])
    ro = Rollouts([{}] * len(prompts), list(prompts), n, tokens, lengths, None, [])
    p_len = max(len(p.ids) for p in prompts)
    rows = np.arange(len(tokens))
    return [
        jax.device_put(training_rows(ro, cfg, 0, (p_len,), rows[s : s + micro])[0]) for s in range(0, len(rows), micro)
    ]


def is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


# ---------------------------------------------------------------- main


class Report:
    """Results so far; rewritten to --out after every phase."""

    def __init__(self, path: str | None, budget: float):
        self.path, self.budget, self.data = path, budget, {"phases": {}}

    def time_left(self, what: str, grace: float = 0.0) -> bool:
        """Whether `what` may start: before the budget, or `grace` seconds past it for a timed
        call whose program is already compiled (short, and it carries the phase's number)."""
        ok = time.perf_counter() - T0 < self.budget + grace
        if not ok:
            log(f"budget of {self.budget:.0f} s spent: skipping {what}")
            self.data.setdefault("skipped", []).append(what)
        return ok

    def phase(self, name: str, **values) -> None:
        values["peak_hbm_gib"] = peak_hbm()
        self.data["phases"][name] = values
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        log(f"{name}: {shown}")
        self.save()

    def save(self) -> None:
        if self.path:
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(self.path + ".tmp", self.path)


def run(args) -> Report:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs.qwen_vl import get_config
    from emor3_jax.core import sharding
    from emor3_jax.models.api import create_model, preset
    from emor3_jax.rl.experience import Experience, GRPOStep, StepSettings
    from emor3_jax.rl.learner import Learner, OptimizerSettings, make_optimizer
    from emor3_jax.sampling.methods import SamplingParams
    from emor3_jax.sampling.sampler import Sampler

    rep = Report(args.out, args.budget)
    runtime = dict(param_dtype=args.param_dtype, compute_dtype="bfloat16", attention_impl=args.attention, remat=True)
    cfg = preset("tiny", vocab_size=1024, **runtime) if args.smoke else preset("3b", **runtime)
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind)
    rows, new = args.prompts * args.n, args.new
    rep.data["setup"] = dict(
        device=kind, jax=jax.__version__, smoke=args.smoke, prompts=args.prompts, n=args.n, new=new,
        image=args.image, param_dtype=args.param_dtype, attention=args.attention, peak_flops=peak,
    )  # fmt: skip
    mesh = make_mesh()
    rules = sharding.DEFAULT_RULES
    t = time.perf_counter()
    model = create_model(cfg, mesh, rules)
    graphdef, params = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    prompts = make_prompts(cfg, args.prompts, args.text_len, args.image, np.random.default_rng(0))
    p_len, grid = len(prompts[0].ids), tuple(prompts[0].image_grid_thw[0])
    init_s = time.perf_counter() - t
    rep.data["setup"].update(params=n_params, prompt_len=p_len, grid=[int(g) for g in grid], init_s=init_s)
    log(
        f"{kind}: random {'tiny' if args.smoke else '3B-shaped'} model, {n_params / 1e9:.3f}B params "
        f"({args.param_dtype}), in {init_s:.1f} s; {rows} rows = {args.prompts} prompts x "
        f"{args.n}, prompt {p_len} tokens (image {args.image}x{args.image}), {new} new tokens"
    )

    # ---- sampling
    sampler = Sampler(cfg, prompt_buckets=(p_len,), gen_buckets=(new,), pad_id=0)
    sp = SamplingParams(temperature=1.0)

    def generate(seed, max_new):
        out = sampler.generate(model, prompts, key=jax.random.key(seed), max_new_tokens=max_new, n=args.n, params=sp)
        return jax.block_until_ready(out)

    t = time.perf_counter()
    out = generate(0, new)
    first = time.perf_counter() - t
    wall, prefill = first, None
    if rep.time_left("sampling second call", grace=GRACE):
        t = time.perf_counter()
        out = generate(1, new)
        wall = time.perf_counter() - t
        t = time.perf_counter()
        generate(2, 1)  # same programs (max_new_tokens is not static): prefill + one step
        prefill = time.perf_counter() - t
    lengths = np.asarray(out.lengths)
    assert (lengths == new).all(), f"every row must run the full {new} tokens, got {sorted(set(lengths.tolist()))}"
    gen_tokens = int(lengths.sum())
    rep.phase(
        "sampling", compile_s=first - wall if wall != first else None, run_s=wall, tokens=gen_tokens,
        tokens_per_s=gen_tokens / wall, prefill_and_first_step_s=prefill, programs=sampler.compiled_programs(),
    )  # fmt: skip
    tokens, old_logp = np.asarray(out.tokens), out.logprobs
    sampler = out = model = None  # frees the decode cache before the update

    # ---- update: forward + backward of every micro-batch, then one optimizer step
    seq = p_len + new
    seqlens = [seq] * rows
    train_tokens = rows * seq
    c = get_config("3b")  # the real variant's optimizer and loss settings
    c.rl.micro_batch_weighting = "by_share"  # the micro-batches below are consecutive rows of `micro`
    tx, _ = make_optimizer(OptimizerSettings.from_config(c, "grpo", 1))
    learner = Learner(graphdef, tx, chunk=min(256, new))
    adv = np.random.default_rng(1).standard_normal(rows).astype(np.float32)
    ref_logp = old_logp  # replaced by the timed reference forward below when it runs
    micro = args.micro
    opt = None
    with sharding.use_mesh(mesh, rules):
        while rep.time_left(f"update (micro-batch {micro})"):
            # The update half of the GRPO step (GRPOStep.update: accumulation over micro-batches,
            # one AdamW step over all rows) on an Experience of the sampled rows.
            batches = training_batches(cfg, prompts, args.n, tokens, micro)
            parts = [np.arange(s, s + micro) for s in range(0, rows, micro)]  # sliced before timing
            settings = StepSettings.from_config(c)
            settings = dataclasses.replace(
                settings, num_generations=args.n, micro_batch=micro, update_batch=args.prompts, max_response_len=new
            )
            step = GRPOStep(
                learner=learner, sampler=None, encoder=None, task=None, settings=settings, pad_id=0, threads=1,
            )  # fmt: skip
            exp = Experience(
                rollouts=None, rewards={}, scores=[], errors=0, advantages=adv, micro=parts,
                batches=[(b, jnp.ones((micro, new), jnp.float32)) for b in batches], p_len=p_len, g_len=new,
                old_logp=[old_logp[m] for m in parts], ref_logp=[ref_logp[m] for m in parts], times={},
            )  # fmt: skip
            try:
                opt = learner.init(params) if opt is None else opt
                t = time.perf_counter()
                params, opt, _ = jax.block_until_ready(step.update(params, opt, exp, step=1))
                first = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
                if not is_oom(e) or micro == 1:
                    raise
                log(f"update: out of memory with micro-batch {micro}; retrying with {micro // 2}")
                rep.data.setdefault("oom_micro_batches", []).append(micro)
                micro //= 2
                continue
            finally:
                step.close()
            if not rep.time_left("update second pass", grace=GRACE):
                break
            t = time.perf_counter()
            params, opt, metrics = jax.block_until_ready(step.update(params, opt, exp, step=2))
            wall = time.perf_counter() - t
            rep.phase(
                "update", micro_batch=micro, compile_s=first - wall, run_s=wall, tokens=train_tokens,
                tokens_per_s=train_tokens / wall, mfu=mfu(text_flops(cfg, seqlens, True), wall, peak),
                mfu_with_vision=mfu(
                    text_flops(cfg, seqlens, True) + vision_flops(cfg, grid, rows, True), wall, peak
                ),
                grad_norm=metrics["grad_norm"],
            )  # fmt: skip
            break

        # ---- reference log-probs: forward only over the same rows
        if "update" in rep.data["phases"] and rep.time_left("ref_logprobs"):
            t = time.perf_counter()
            jax.block_until_ready(learner.logprobs(params, batches[0], p_len - 1, new))
            first = time.perf_counter() - t
            t = time.perf_counter()
            ref = jax.block_until_ready([learner.logprobs(params, b, p_len - 1, new) for b in batches])
            wall = time.perf_counter() - t
            assert np.isfinite(np.asarray(ref[0])).all(), "reference log-probs are not finite"
            rep.phase(
                "ref_logprobs", micro_batch=micro, compile_s=first - wall / len(batches), run_s=wall,
                tokens=train_tokens, tokens_per_s=train_tokens / wall,
                mfu=mfu(text_flops(cfg, seqlens, False), wall, peak),
                mfu_with_vision=mfu(
                    text_flops(cfg, seqlens, False) + vision_flops(cfg, grid, rows, False), wall, peak
                ),
            )  # fmt: skip

    ph = rep.data["phases"]
    if all(k in ph for k in ("sampling", "update", "ref_logprobs")):
        wall = sum(ph[k]["run_s"] for k in ("sampling", "update", "ref_logprobs"))
        rep.phase("grpo_step", run_s=wall, tokens=train_tokens, tokens_per_s=train_tokens / wall)
    return rep


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    return flops / seconds / peak if peak else None


def table(rep: Report) -> None:
    ph = rep.data["phases"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    print(f"\n{'phase':<14}{'compile s':>10}{'run s':>9}{'tokens':>9}{'tokens/s':>10}", end="")
    print(f"{'MFU':>7}{'+vision':>8}{'HBM GiB':>8}")
    for name in ("sampling", "update", "ref_logprobs", "grpo_step"):
        if name not in ph:
            print(f"{name:<14}{'skipped':>10}")
            continue
        r = ph[name]
        print(
            f"{name:<14}{fmt(r.get('compile_s'), '.1f'):>10}{r['run_s']:>9.2f}{r['tokens']:>9}"
            f"{r['tokens_per_s']:>10,.0f}{fmt(r.get('mfu'), '.1%'):>7}{fmt(r.get('mfu_with_vision'), '.1%'):>8}"
            f"{fmt(r.get('peak_hbm_gib'), '.1f'):>8}"
        )
    step, update = ph.get("grpo_step"), ph.get("update")
    ratios = {
        "tokens_per_gpu_vs_easyr1": step and step["tokens_per_s"] / EASYR1["tokens_per_gpu"],
        "mfu_vs_easyr1": update and update["mfu"] and update["mfu"] / EASYR1["mfu"],
    }
    rep.data["ratios"] = ratios
    rep.save()
    for k, v in ratios.items():
        print(f"ratio {k}: {fmt(v, '.2f')}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI)")
    ap.add_argument("--out", help="write every number to this JSON file (after each phase)")
    ap.add_argument("--prompts", type=int, help="default 32 (smoke 2)")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (prefill shared by the group)")
    ap.add_argument("--new", type=int, help="new tokens per row, default 512 (smoke 8)")
    ap.add_argument("--text-len", type=int, help="text tokens per prompt besides the image, default 318 (smoke 22)")
    ap.add_argument("--image", type=int, help="image side in pixels, default 448 (smoke 112)")
    ap.add_argument("--micro", type=int, default=4, help="rows per forward/backward (see the docstring)")
    ap.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--attention", default="xla", choices=("xla", "cudnn", "einsum", "flash"))
    ap.add_argument(
        "--budget", type=float, default=390.0, help="seconds after which no phase starts compiling (see GRACE)"
    )
    args = ap.parse_args()
    small = args.smoke
    args.prompts = args.prompts or (2 if small else 32)
    args.new = args.new or (8 if small else 512)
    args.text_len = args.text_len or (22 if small else 318)
    args.image = args.image or (112 if small else 448)
    if (args.prompts * args.n) % args.micro:
        ap.error(f"--micro {args.micro} must divide the {args.prompts * args.n} rows (--prompts x --n)")
    if small:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    table(run(args))


if __name__ == "__main__":
    main()
