"""Dry run: per-device memory of a run's resident state on a target topology, on fake CPU devices.

    python -m emor3_jax.train --config=configs/qwen_vl.py:7b --dry_run=64 \\
        --config.mesh="[('data',1),('fsdp',16),('tensor',4)]"

`--dry_run=N` stands for the target's global device count (all hosts together). The mesh is
built over N fake CPU devices and the state exists only as shapes (`nnx.eval_shape`,
`jax.eval_shape`): nothing is allocated or compiled, so a 7B model on 64 "devices" takes
seconds on a laptop.

Counted, per device, from each array's shard shape under the sharding the run gives it:
params, optimizer state (AdamW moments, step counters), the GRPO reference copy, one
gradient accumulator (param-shaped, param dtype), the rollout copy of the policy
(rl.rollout_dtype in rl.rollout_sharding's layout; none when rl.rollout_dtype is ""), and the
largest KV cache of a step's sampling calls (the sampler allocates each call's and frees it
after): the rollout's or the image reflection's, its decode slots (sampling.max_rows, or one
per rollout_batch * num_generations row when 0) x (prompt bucket + generation bucket) entries
in the compute dtype (sampling.kv_cache_dtype="int8": int8 plus an fp32 scale per entry and kv
head); with a paged cache (sampling.page_size), the pool the sampler would allocate for that
call (sampling.kv_pages, or enough that no row waits; each shard's spare page). The total
adds them all, an upper bound: the rollout copy and the KV cache live while the step
samples, the gradient accumulator while it updates. Not counted:
activations, logit chunks, a micro-batch's fresh gradients while they are summed, the prompt
cache of the prefill group being decoded (min(max_rows // n, sampling.prefill_group) prompts x
prompt bucket, n = 8 for the rollout and 1 for a reflection; all prompts when max_rows is 0;
gathered whole onto every device while its rows take slots, so `--compile_for` is the measure),
and the evaluation's cache.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from emor3_jax import config_lib
from emor3_jax.core import sharding
from emor3_jax.emo_r3 import rewards
from emor3_jax.emo_r3.task import EmoR3, longest_reflection_prompt
from emor3_jax.models import lora
from emor3_jax.models.api import ModelConfig, abstract_model, cache_length, cache_shapes, preset
from emor3_jax.rl import reference, rollout_weights
from emor3_jax.rl.learner import OptimizerSettings, make_optimizer
from emor3_jax.sampling.sampler import Sampler, bucket

CATEGORIES = ("params", "optimizer", "reference", "gradients", "rollout", "kv_cache")
GiB = 1024**3


def use_fake_devices(n: int) -> None:
    """Makes this process see `n` CPU devices; must run before anything touches a JAX backend."""
    if n < 1:
        raise ValueError(f"--dry_run={n}: give the target's global device count, e.g. --dry_run=64")
    # jax_num_cpu_devices, unlike XLA_FLAGS, still applies after `import jax` (the config file
    # imports it while absl parses flags), as long as no backend has started.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    if jax.device_count() != n:
        raise RuntimeError(
            f"--dry_run={n}: this process already has {jax.device_count()} devices (a JAX backend "
            "started before the dry run); run it in a fresh process"
        )


def model_config(c: ConfigDict) -> ModelConfig:
    """The architecture: the HF checkpoint's config.json, else the variant's preset."""
    runtime = config_lib.runtime_fields(c)
    if c.hf_path:
        return ModelConfig.from_hf_dir(c.hf_path, **runtime)
    if c.model.preset == "tiny":
        raise ValueError(
            "--dry_run needs --config=configs/qwen_vl.py:3b or :7b (or --config.hf_path); the tiny model's "
            "vocabulary comes from a tokenizer built at run time"
        )
    return preset(c.model.preset, **runtime)


def make_mesh(c: ConfigDict) -> Mesh:
    """config.mesh over all devices, the error naming the flags when they disagree."""
    shape = [tuple(x) for x in c.mesh]
    try:
        return sharding.make_mesh(shape)
    except ValueError as e:
        raise ValueError(
            f"--config.mesh={shape} does not fit --dry_run={jax.device_count()} devices: {e}. "
            "The mesh's product must equal the global device count across all hosts."
        ) from None


def abstract_state(tree, mesh: Mesh, rules):
    """An abstract tree (params, optimizer state) with its run-time shardings: variables with
    logical `axes` by the rules, anything else (step counters) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if isinstance(x, nnx.Variable):
            s = sharding.named_sharding(x.get_metadata()["axes"], x.shape, mesh, rules)
            return x.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _sharded(tree, mesh: Mesh, rules) -> list[jax.ShapeDtypeStruct]:
    """Leaves of an abstract tree with their run-time sharding (`abstract_state`)."""
    return jax.tree.leaves(abstract_state(tree, mesh, rules))


def _bytes(leaves: list[jax.ShapeDtypeStruct]) -> tuple[int, int]:
    """(bytes on the fullest device, global bytes). A NamedSharding's shards are equal-sized,
    so `shard_shape` is every device's shard, the largest included."""
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
    return per_device, sum(x.size * x.dtype.itemsize for x in leaves)


def decode_caches(c: ConfigDict) -> dict[str, tuple[int, int]]:
    """(decode slots W, cache entries S before the kernel's rounding) of each sampling call of a
    GRPO step: the rollout (rollout_batch prompts x num_generations rows) and, when the image
    reflection runs, its rollout_batch * num_generations one-row prompts, up to
    `longest_reflection_prompt` tokens each (2 * rl.max_prompt_len - 3 when the image counts as
    one token against the limit, as in the official run)."""
    rows = c.rl.rollout_batch * c.rl.num_generations
    if c.sampling.max_rows:  # continuous batching: max_rows slots, refilled as rows stop
        rows = min(rows, c.sampling.max_rows)
    p, g = c.sampling.prompt_buckets, c.sampling.gen_buckets
    rollout = bucket(c.rl.max_prompt_len, p, "rl.max_prompt_len") + bucket(c.rl.max_response_len, g, "max_response_len")
    caches = {"rollout": (rows, rollout)}
    task = EmoR3.from_config(c)
    if task.reflects and rewards.runs(c.reward.reflection, "image"):
        prompt = bucket(longest_reflection_prompt(c), p, "the longest image reflection prompt")
        caches["image_reflection"] = (rows, prompt + bucket(task.reflection.max_new, g, "the reflection length"))
    return caches


def paged_pools(c: ConfigDict, cfg: ModelConfig, mesh: Mesh, rules) -> dict[str, tuple[int, int]]:
    """(pool pages, each shard's spare included; entries per page) of each sampling call of a
    GRPO step with a paged cache (sampling.page_size): the sampler's own layout of the rollout
    and of the image reflection, under the mesh that splits the pool."""
    s = c.sampling
    sampler = Sampler(
        cfg,
        prompt_buckets=s.prompt_buckets,
        gen_buckets=s.gen_buckets,
        pad_id=0,
        max_rows=s.max_rows,
        prefill_group=s.prefill_group,
        page_size=s.page_size,
        kv_pages=s.kv_pages,
    )
    calls = {"rollout": (c.rl.rollout_batch, c.rl.max_prompt_len, c.rl.num_generations, c.rl.max_response_len)}
    task = EmoR3.from_config(c)
    if task.reflects and rewards.runs(c.reward.reflection, "image"):
        rows = c.rl.rollout_batch * c.rl.num_generations
        calls["image_reflection"] = (rows, longest_reflection_prompt(c), 1, task.reflection.max_new)
    with sharding.use_mesh(mesh, rules):
        shards = sharding.axis_shards("batch")
        layouts = {name: sampler.layout(*args) for name, args in calls.items()}
    return {name: (lay.pages + shards, lay.page) for name, lay in layouts.items()}


def kv_cache(c: ConfigDict, cfg: ModelConfig, mesh: Mesh, rules) -> tuple[list[jax.ShapeDtypeStruct], list[str], str]:
    """The largest decode cache of a GRPO step (`decode_caches`; the sampler allocates each call's
    and frees it after): K and V [Y, W, S, K, H], every layer stacked (W decode slots, S cache
    entries per slot), in the compute dtype or int8 with their scales [Y, W, K, S]
    (sampling.kv_cache_dtype), and the call it belongs to. Paged: the pool [Y, pages, page, ...]
    (`paged_pools`) in place of W x S."""
    if c.sampling.page_size:
        name, (rows, slots) = max(paged_pools(c, cfg, mesh, rules).items(), key=lambda kv: kv[1][0])
    else:
        name, (rows, slots) = max(decode_caches(c).items(), key=lambda kv: kv[1][0] * kv[1][1])
        slots = cache_length(cfg.attention_impl, slots)  # as the sampler rounds it
    leaves, fallbacks = [], []
    for field, (axes, shape, dtype) in cache_shapes(
        cfg.text, rows, slots, cfg.compute_dtype, c.sampling.kv_cache_dtype
    ).items():
        spec, fb = sharding.logical_to_spec(axes, shape, mesh, rules)
        leaves.append(jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)))
        fallbacks += [f"kv_cache {field} {shape}: {f}" for f in fb]
    return leaves, fallbacks, name


def _rollout_copy(c: ConfigDict, params, mesh: Mesh, rules) -> list[jax.ShapeDtypeStruct]:
    """The policy's copy the rollouts sample with, in its dtype and layout (none without one)."""
    if not c.rl.rollout_dtype:
        return []
    return jax.tree.leaves(rollout_weights.abstract(params, mesh, rules, c.rl.rollout_dtype, c.rl.rollout_sharding))


def memory(c: ConfigDict) -> dict:
    """Bytes per category on the fullest device and globally, plus what the mesh replicates.

    Needs the target's device count to be visible already (`use_fake_devices`).
    """
    mesh = make_mesh(c)  # first: a bad topology fails before the model is traced
    cfg = model_config(c)
    rules = [tuple(r) for r in c.logical_axis_rules]
    _, params = nnx.split(abstract_model(cfg))
    tx, _ = make_optimizer(OptimizerSettings.from_config(c, "grpo", max(c.rl.steps, 1)))
    trained = nnx.split_state(params, lora.trainable(c.lora.rank), ...)[0]  # everything, or the adapters
    opt = jax.eval_shape(tx.init, trained)
    param_leaves = _sharded(params, mesh, rules)
    cache, cache_fallbacks, cache_call = kv_cache(c, cfg, mesh, rules)
    parts = {
        "params": param_leaves,
        "optimizer": _sharded(opt, mesh, rules),
        # the GRPO reference: a copy, or with LoRA a copy of the adapters over the base itself
        "reference": (
            _sharded(lora.adapters(params), mesh, rules)
            if c.lora.rank
            else reference.abstract(param_leaves, config_lib.reference_dtype(c))
        ),
        "gradients": _sharded(trained, mesh, rules),  # the micro-batch accumulator: shaped as what trains
        "rollout": _rollout_copy(c, params, mesh, rules),
        "kv_cache": cache,
    }
    per_device, global_ = {}, {}
    for name, leaves in parts.items():
        per_device[name], global_[name] = _bytes(leaves)
    per_device["total"], global_["total"] = sum(per_device.values()), sum(global_.values())
    k_shape = cache[0].shape  # [Y, W, S, K, H]
    return {
        "variant": c.variant if not c.hf_path else c.hf_path,
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "num_params": int(sum(np.prod(x.shape) for x in param_leaves)),
        "param_dtype": cfg.param_dtype,
        "rollout_copy": f"{c.rl.rollout_dtype}, {c.rl.rollout_sharding}" if c.rl.rollout_dtype else "none",
        "compute_dtype": cfg.compute_dtype,
        "kv_rows": k_shape[1],
        "kv_slots": k_shape[2],
        "kv_call": cache_call,
        "kv_paged": bool(c.sampling.page_size),
        "kv_dtype": "int8 + fp32 scales" if c.sampling.kv_cache_dtype == "int8" else cfg.compute_dtype,
        "per_device": per_device,
        "global": global_,
        "fallbacks": sharding.describe_fallbacks(params, mesh, rules) + cache_fallbacks,
    }


def report(m: dict) -> str:
    """The memory table of `memory(...)` as text."""
    mesh = " x ".join(f"{k}={v}" for k, v in m["mesh"].items())
    lines = [
        f"dry run: {m['variant']}, {m['num_params'] / 1e9:.2f}B params ({m['param_dtype']}), "
        f"{m['devices']} devices, mesh {mesh}",
        f"{'':12}{'GiB/device':>12}{'GiB global':>12}",
    ]
    notes = {
        "optimizer": "AdamW moments + step counters",
        "reference": "GRPO reference policy",
        "gradients": "accumulator over micro-batches",
        "rollout": f"the policy's copy the rollouts sample with ({m['rollout_copy']})",
        "kv_cache": (
            f"{m['kv_rows']} pages of {m['kv_slots']} entries (paged), {m['kv_dtype']} ({m['kv_call']})"
            if m["kv_paged"]
            else f"{m['kv_rows']} decode slots x {m['kv_slots']} entries, {m['kv_dtype']} ({m['kv_call']})"
        ),
    }
    for name in (*CATEGORIES, "total"):
        gib = f"{m['per_device'][name] / GiB:12.2f}{m['global'][name] / GiB:12.2f}"
        lines.append(f"{name:12}{gib}  {notes.get(name, '')}".rstrip())
    lines.append(
        "not included: activations, logit chunks, a micro-batch's fresh gradients, the prefill group's "
        "prompt cache, the evaluation's cache, XLA workspace"
    )
    if m["fallbacks"]:
        lines.append(f"replicated because the mesh does not divide them ({len(m['fallbacks'])}):")
        lines += [f"  {f}" for f in m["fallbacks"]]
    else:
        lines.append("replicated because the mesh does not divide them: none")
    return "\n".join(lines)


def main(c: ConfigDict, num_devices: int) -> dict:
    """`--dry_run=N`: fake N devices, print the table, return the numbers."""
    use_fake_devices(num_devices)
    m = memory(c)
    print(report(m))
    return m
