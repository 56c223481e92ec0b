"""Forward and forward+backward: our jitted Flax Qwen2.5-VL vs transformers' PyTorch model.

Same random weights (built in transformers, saved, loaded with our `load_hf`), fp32, CPU,
one script so both see the same machine state. Mid-size model (~100M parameters): 8 text
layers of width 512, a 4-block vision tower; batch 4 rows of one 224x224 image + 512 text
tokens.

    python -m bench.forward [--iters 5] [--batch 4] [--text 512] [--small]

(--small: a 2-layer model of width 64 and a small peak matmul, for the smoke test: measures nothing.)

Prints tokens/s for each side, `ratio <name>: <x>` (ours over transformers, higher is
better), compile time apart, and achieved FLOP/s as a fraction of a fp32 matmul peak
measured in this run. CPU/wall time shows when another process competed for the cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import IMAGE, VEND, VSTART, hf_config, load_fp32, make_mesh, random_hf, timeit  # noqa: E402
from emor3_jax.models.api import prepare_inputs  # noqa: E402


def make_batch(batch: int, text: int, rng: np.random.Generator) -> dict:
    grid = (1, 16, 16)  # 224x224 pixels in 14-pixel patches
    n_img = grid[1] * grid[2] // 4
    rows = [
        np.concatenate(
            [
                rng.integers(0, IMAGE - 10, text // 2),
                [VSTART],
                [IMAGE] * n_img,
                [VEND],
                rng.integers(0, IMAGE - 10, text - text // 2),
            ]
        )
        for _ in range(batch)
    ]
    ids = np.stack(rows).astype(np.int64)
    return dict(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        pixel_values=rng.standard_normal((batch * grid[1] * grid[2], 3 * 2 * 14 * 14)).astype(np.float32),
        image_grid_thw=np.array([grid] * batch),
    )


def matmul_peak(n: int = 2048) -> float:
    """Best fp32 FLOP/s of an n^3 matmul, numpy (OpenBLAS) or XLA, whichever is faster here."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    best = []
    t, _ = timeit(lambda: a @ a, 3)
    best.append(2 * n**3 / t)
    x = jnp.asarray(a)
    f = jax.jit(lambda x: x @ x)
    f(x).block_until_ready()
    t, _ = timeit(lambda: f(x).block_until_ready(), 3)
    best.append(2 * n**3 / t)
    return max(best)


def logprob_sum_torch(logits, ids):
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum()


def logprob_sum_jax(logits, ids):
    return jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), ids[:, 1:, None], -1).sum()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--small", action="store_true", help="the smoke architecture and a 256^3 peak matmul (CI)")
    args = ap.parse_args()
    hf = random_hf(hf_config(small=args.small)).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp)
    ours = load_fp32(tmp, make_mesh())
    batch = make_batch(args.batch, args.text, np.random.default_rng(0))
    inputs = prepare_inputs(ours.cfg, **batch)
    inputs.pop("rope_deltas")
    tokens = batch["input_ids"].size
    print(
        f"model: {n_params / 1e6:.1f}M params; batch {args.batch} x {batch['input_ids'].shape[1]} tokens "
        f"(one 224x224 image each); jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )

    # transformers: default attention (sdpa), M-RoPE positions through mm_token_type_ids.
    t_ids = torch.tensor(batch["input_ids"])
    t_kw = dict(
        input_ids=t_ids,
        attention_mask=torch.tensor(batch["attention_mask"]),
        pixel_values=torch.tensor(batch["pixel_values"]),
        image_grid_thw=torch.tensor(batch["image_grid_thw"]),
        mm_token_type_ids=(t_ids == IMAGE).long(),
    )

    def torch_fwd():
        with torch.no_grad():
            hf(**t_kw)

    def torch_fwd_bwd():
        hf.zero_grad(set_to_none=True)
        logprob_sum_torch(hf(**t_kw).logits, t_ids).backward()

    peak_n = 256 if args.small else 2048
    peak = matmul_peak(peak_n)  # before torch runs anything (see below)
    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))
    grad = jax.jit(jax.grad(lambda s, x: logprob_sum_jax(nnx.merge(graphdef, s)(**x), x["input_ids"])))

    # All of ours first, then transformers: torch's OpenMP threads keep spinning after its
    # calls and would steal the cores from XLA if the two were interleaved.
    ours_res = {}
    for name, jfn in (("forward", fwd), ("forward_backward", grad)):
        t0 = time.perf_counter()
        compiled = jfn.lower(state, inputs).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(state, inputs))
        t, cpu = timeit(lambda: jax.block_until_ready(compiled(state, inputs)), args.iters)
        ours_res[name] = (t, cpu, compile_s, compiled.cost_analysis()["flops"])
    results = {}
    for name, tfn in (("forward", torch_fwd), ("forward_backward", torch_fwd_bwd)):
        tfn()  # warm-up
        ref_t, ref_cpu = timeit(tfn, args.iters)
        ours_t, ours_cpu, compile_s, flops = ours_res[name]
        results[name] = (ours_t, ref_t, flops)
        print(
            f"{name}: ours {tokens / ours_t:,.0f} tok/s ({ours_t * 1e3:.0f} ms, cpu/wall {ours_cpu:.2f}, "
            f"compile {compile_s:.1f} s) | transformers {tokens / ref_t:,.0f} tok/s ({ref_t * 1e3:.0f} ms, "
            f"cpu/wall {ref_cpu:.2f}) | XLA flops {flops / 1e9:.1f} GFLOP"
        )

    print(f"fp32 matmul peak here: {peak / 1e9:.0f} GFLOP/s ({peak_n}^3, best of numpy and XLA)")
    for name, (ours_t, ref_t, flops) in results.items():
        print(
            f"{name}: ours {flops / ours_t / 1e9:.0f} GFLOP/s = {flops / ours_t / peak:.0%} of peak; "
            f"transformers {flops / ref_t / 1e9:.0f} GFLOP/s = {flops / ref_t / peak:.0%} of peak (same FLOP count)"
        )
    for name, (ours_t, ref_t, _) in results.items():
        print(f"ratio {name}_vs_transformers: {ref_t / ours_t:.2f}")


if __name__ == "__main__":
    main()
