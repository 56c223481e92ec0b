"""Every program of a GRPO step compiled for a TPU topology or a node of GPUs on this machine's
CPU: does the run fit on those chips, and how long would a step take at best?

    python -m emor3_jax.train --config=configs/qwen_vl.py:3b --compile_for=v5p:2x2x1
    python -m emor3_jax.train --config=configs/qwen_vl.py:7b --compile_for=v5e:4x4 \\
        --compile_slices=2 --config.mesh="(('data',2),('fsdp',-1),('tensor',1))"
    python -m emor3_jax.train --config=configs/qwen_vl.py:3b --compile_for=h200:8

The TPU compiler (libtpu: the `tpu` and `test` extras) compiles for a named topology without
its chips (`jax.experimental.topologies`); XLA's CUDA compiler (the `compile-gpu` extra) for
N H100s or H200s of a node (several nodes: --compile_slices), described by the target configs
of `gpu_targets`. The run's mesh is laid over the topology's devices;
parameters, optimizer state, reference and rollout copy (rl.rollout_dtype) are abstract arrays
with the run's shardings (nothing is allocated, no checkpoint is read); and the jitted
functions the run itself calls (the rollout copy's, the Sampler's prefill, slots and decode
programs, which sample with that copy when there is one, the Learner's log-probs, gradients,
accumulation and optimizer step) are lowered and compiled at the config's shapes, taken at
the worst case the config admits: prompts at rl.max_prompt_len's bucket, each with the
largest image that fits it and data.max_pixels (a batch's images past the largest vision
bucket in chunks of it, as the run lays them out), responses of rl.max_response_len,
micro-batches of full-length rows.

Per program, per chip: compile seconds; XLA's memory analysis (argument, output, temporary
and code bytes); its peak (argument + output - aliased + temporary + code) plus what the run
keeps resident beside it (params, optimizer state, reference, gradient accumulator, and while
the step samples the rollout copy; a generate call's KV cache is its decode program's
argument, allocated per call and freed with it); flops and bytes accessed (cost analysis; a
GPU compiled without one has none: `_lowered_cost`); and a roofline time, the larger of
flops over the chip's peak bf16 rate and bytes over its HBM bandwidth. Then the step: peak
HBM per chip against the chip's, roofline seconds per GRPO step, and tokens per second per
chip at that roofline. Rooflines are lower
bounds on time (no communication, no host, perfect overlap), so the tokens per second are
PROJECTIONS, upper bounds, never measurements. A decode program's cost is that of one loop
iteration (XLA counts a while loop's body once); the step counts every row running to its
response limit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from emor3_jax import config_lib, dry_run, factory, gpu_targets
from emor3_jax.core import paths, sharding
from emor3_jax.core.batches import PackedBatch, SequenceBatch, bucket
from emor3_jax.emo_r3 import rewards
from emor3_jax.emo_r3.task import EmoR3, longest_reflection_prompt
from emor3_jax.models import lora
from emor3_jax.models.api import Cache as KVCache
from emor3_jax.models.api import PagedCache, abstract_model, cache_shapes
from emor3_jax.models.qwen25_vl.vision import vision_layout
from emor3_jax.rl import packing, reference, rollout_weights
from emor3_jax.rl.experience import StepSettings
from emor3_jax.rl.learner import Learner, OptimizerSettings, make_optimizer
from emor3_jax.sampling import pages
from emor3_jax.sampling.methods import GREEDY, SamplingParams
from emor3_jax.sampling.sampler import Draw, GroupRows, Settings

GiB = 1024**3
# EasyR1's published GRPO throughput for Qwen2.5-VL-3B and -7B on 8 x H100 (a measurement on
# GPUs, quoted in issue 21), printed beside our projections.
EASYR1_TOKENS_PER_S_PER_GPU = 1200


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's (a TPU's or a GPU's) HBM bytes, peak bf16 flop/s and HBM bytes/s, and where
    they come from."""

    hbm_bytes: int
    bf16_flops: float
    hbm_bytes_per_s: float
    source: str

    def per_device(self, cores: int) -> Chip:
        """The figures per JAX device when the topology shows each of a chip's `cores`
        TensorCores as a device (libtpu's v4 topologies do)."""
        if cores == 1:
            return self
        share = f"; per device, 1/{cores} of a chip (one TensorCore)"
        return Chip(self.hbm_bytes // cores, self.bf16_flops / cores, self.hbm_bytes_per_s / cores, self.source + share)

    def preallocated(self, fraction: float) -> Chip:
        """A GPU as the run sees it: XLA's allocator holds `fraction` of its memory
        (--config.gpu_memory_fraction), and no program gets more."""
        source = f"{self.source}; {fraction:g} of the memory preallocated (--config.gpu_memory_fraction)"
        return dataclasses.replace(self, hbm_bytes=int(self.hbm_bytes * fraction), source=source)


# Google Cloud TPU documentation, "key specifications" of each version (HBM read as GiB: the
# compiler's own limit on a v5e is 15.75 GiB of 16).
CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1200e9, "cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2, 1,200 GBps"),
    "v5e": Chip(16 * GiB, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB HBM2, 819 GBps"),
    "v5p": Chip(95 * GiB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB HBM2e, 2,765 GBps"),
    "v6e": Chip(32 * GiB, 918e12, 1638e9, "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM, 1,638 GBps"),
    # NVIDIA's datasheets and NVML's memory totals (gpu_targets.GPUS says which)
    **{k: Chip(g.memory_bytes, g.bf16_flops, g.hbm_bytes_per_s, g.source) for k, g in gpu_targets.GPUS.items()},
}
# An HGX H100/H200 node's GPUs, all on one NVLink switch; more are more nodes (--compile_slices).
GPUS_PER_NODE = 8

# What shrinks a program of each kind, for the verdict.
SHRINK = {
    "sampler": "sampling.max_rows (decode slots; 0 = one per row), sampling.prefill_group (prompts per prefill "
    "group), rl.max_prompt_len, rl.max_response_len, "
    "rl.rollout_sharding='fsdp' (a replicated rollout copy holds the whole model on every chip), "
    "a larger fsdp axis in --config.mesh",
    "rollout_weights": "rl.rollout_sharding='fsdp' (the copy sharded as the params) or 'tensor' (over the tensor "
    "axis), or rl.rollout_dtype='' (no copy)",
    "learner": "rl.micro_batch, rl.pack_length, model.remat, a larger fsdp axis in --config.mesh",
    "state": "a larger fsdp axis in --config.mesh (more chips)",
    "cold_start": "cold_start.batch_size, cold_start.judge_batch_size, model.remat, "
    "a larger fsdp axis in --config.mesh",
}


@dataclasses.dataclass
class Program:
    """One jitted function of the run, called with abstract arguments.

    runs: calls per GRPO step (phase "grpo"), per evaluation ("eval") or per cold-start step
    ("cold_start"); a decode program's calls are its loop iterations. beside: resident state
    (names of `resident`'s entries) the run holds on the chips while it runs, besides its
    arguments. kind: a key of SHRINK.
    """

    name: str
    fn: Callable
    args: tuple
    runs: float
    beside: tuple[str, ...]
    phase: str
    kind: str


@dataclasses.dataclass
class Target:
    """What every program shares: the config, model, mesh, abstract state and the run's objects."""

    c: ConfigDict
    cfg: object
    mesh: Mesh
    rules: list
    graphdef: object
    params: object  # abstract nnx.State, leaves with the params' shardings
    rt: factory.Runtime
    task: EmoR3
    settings: StepSettings
    learner: Learner  # GRPO's, with its optimizer
    opt: object  # abstract optimizer state with its shardings
    ref: object  # abstract GRPO reference: the params' shapes and shardings, rl.reference_dtype
    # The copy the policy samples with (rl/rollout_weights.py): abstract, in its dtype and layout,
    # and the jitted function that makes it; None: the rollouts sample with the params.
    rollout: object = None
    copy_fn: Callable | None = None
    notes: list[str] = dataclasses.field(default_factory=list)  # where the shapes had to give way
    caches: dict = dataclasses.field(default_factory=dict)  # the sampler's decode caches, by name


def topology_devices(name: str, slices: int = 1) -> list:
    """The compile-only devices of TPU topology `name` (e.g. v5p:2x2x1) or of N GPUs (e.g.
    h200:8), `slices` slices or nodes of it."""
    from jax.experimental import topologies

    if slices < 1:
        raise ValueError(f"--compile_slices={slices}: give 1 or more slices")
    if is_gpu(name):
        return _gpu_devices(name, slices)
    # Compiling uses no chip: share libtpu with another process (a run on this TPU VM, a second
    # compile) instead of failing on its lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        kw = {"num_slices": slices} if slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices)
    except Exception as e:  # libtpu's errors: an unknown name, no libtpu
        raise ValueError(
            f"--compile_for={name}: the TPU compiler does not know this topology ({e}); give a name such as "
            "v5p:2x2x1, v5e:2x2, v4:2x2x1 or v6e:2x2, and install libtpu (pip install -e '.[tpu]')"
        ) from None


def is_gpu(name: str) -> bool:
    return name.split(":")[0].lower() in gpu_targets.GPUS


def _gpu_devices(name: str, nodes: int) -> list:
    """`nodes` nodes of N GPUs each for `name` = <gpu>:<N>, from XLA's CUDA compiler and the
    GPU's target config. The topology is <NVLink domains>x<hosts per domain>x<GPUs per host>:
    each node its own domain. Device ids run node by node (process_index: the node)."""
    from jax.experimental import topologies

    model, _, count = name.partition(":")
    if not count.isdigit() or not 1 <= int(count) <= GPUS_PER_NODE:
        raise ValueError(
            f"--compile_for={name}: give the GPUs of one node, 1 to {GPUS_PER_NODE} (e.g. {model}:8); "
            "more nodes with --compile_slices"
        )
    # No GPU here: the plugin need not check CUDA's libraries against a driver.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    config = gpu_targets.target_config(gpu_targets.GPUS[model.lower()])
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"{nodes}x1x{count}")
    except NotImplementedError:  # no CUDA plugin: jax knows no cuda topology
        raise ValueError(
            f"--compile_for={name} needs XLA's CUDA compiler: pip install -e '.[compile-gpu]' "
            "(jax[cuda12], several GB; no GPU needed)"
        ) from None
    return list(topology.devices)


def chip_of(name: str) -> Chip:
    version = name.split(":")[0].lower()
    if version not in CHIPS:
        raise ValueError(f"--compile_for={name}: no chip table for {version!r}; known: {sorted(CHIPS)}")
    return CHIPS[version]


def _replicated(mesh: Mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _host(mesh: Mesh, tree):
    """Host (numpy) arrays as the abstract, replicated arrays jit makes of them."""
    return jax.tree.map(lambda a: _replicated(mesh, np.shape(a), np.asarray(a).dtype), tree)


def _architecture(c: ConfigDict, scratch: paths.Scratch) -> tuple[object, dict[str, int]]:
    """The model config and Qwen's special-token ids: the tiny preset is sized to its built-in
    tokenizer (built into the workdir, as the run does); 3b/7b and hf_path need no tokenizer."""
    if c.model.preset == "tiny" and not c.hf_path:
        tok = factory.load_tokenizer(c, scratch)
        special = factory.check_tokenizer(tok, f"the {c.builtin_tokenizer} tokenizer")
        return config_lib.model_config(c, len(tok), special), special
    cfg = dry_run.model_config(c)
    t = cfg.text
    special = {
        "<|im_end|>": t.eos_token_id,
        "<|endoftext|>": t.bos_token_id,
        "<|image_pad|>": cfg.image_token_id,
        "<|video_pad|>": cfg.video_token_id,
    }
    return cfg, special


def target(c: ConfigDict, devices: list, scratch: paths.Scratch) -> Target:
    """The run's mesh over `devices`, its model as abstract state, its sampler and step settings."""
    try:
        mesh = sharding.make_mesh([tuple(x) for x in c.mesh], devices)
    except ValueError as e:
        raise ValueError(f"--config.mesh={c.mesh} does not fit the topology's {len(devices)} chips: {e}") from None
    cfg, special = _architecture(c, scratch)
    rules = [tuple(r) for r in c.logical_axis_rules]
    graphdef, state = nnx.split(abstract_model(cfg))
    params = sharding.abstract_with_shardings(state, mesh, rules)
    rt = factory.build(c, None, special, cfg, mesh, rules)
    tx, _ = make_optimizer(OptimizerSettings.from_config(c, "grpo", max(c.rl.steps, 1)))
    learner = Learner(graphdef, tx, trainable=lora.trainable(c.lora.rank))
    opt = dry_run.abstract_state(jax.eval_shape(tx.init, learner.trained(params)), mesh, rules)
    settings = StepSettings.from_config(c)
    # with LoRA the reference is the base with copied adapters: the params' shapes, dtypes and
    # shardings (reference.frozen)
    ref = params if c.lora.rank else reference.abstract(params, config_lib.reference_dtype(c))
    t = Target(c, cfg, mesh, rules, graphdef, params, rt, EmoR3.from_config(c), settings, learner, opt, ref)
    if c.rl.rollout_dtype:
        dtype, layout = c.rl.rollout_dtype, c.rl.rollout_sharding
        t.rollout = rollout_weights.abstract(params, mesh, rules, dtype, layout)
        t.copy_fn = rollout_weights.copier(params, mesh, rules, dtype, layout)
    with sharding.use_mesh(mesh, rules):  # a paged cache's layout depends on the mesh's batch split
        for g in generates(t):  # the sampler keeps one cache per shape between calls
            sh = g.shapes(rt.sampler)
            t.caches[_cache_name(sh)] = _cache(t, sh)
    return t


# ---------------------------------------------------------------- abstract inputs
def _image_side(t: Target) -> int:
    """Side (in patches, even) of the square image each prompt shows: the largest that fits
    data.max_pixels and a prompt of rl.max_prompt_len (two tokens for the vision markers).
    Validation holds one such image within the largest vision bucket."""
    c, v = t.c, t.cfg.vision
    patches = min(c.data.max_pixels // v.patch_size**2, v.merge_unit * (c.rl.max_prompt_len - 2))
    return 2 * int(math.isqrt(patches) // 2)


def _vision(t: Target, shown: list[int]) -> dict:
    """Abstract pixels [L, C] and the layout of images shown in reading order (`shown[k]`: the
    distinct image behind the k-th), each image the worst-case size (`_image_side`). Past the
    largest vision bucket the layout is chunked as the run's is (`vision_layout`), and a note
    says so: the tower's loop runs one chunk of the largest bucket at a time."""
    distinct = max(shown) + 1
    side = _image_side(t)
    layout = vision_layout(
        np.tile([1, side, side], (distinct, 1)), None, t.cfg.vision, t.cfg.vision_buckets, np.asarray(shown)
    )
    if layout.windows.index.ndim == 3:
        chunks, largest = layout.windows.index.shape[0], t.cfg.vision_buckets[-1]
        note = (
            f"{distinct} images of {side}x{side} patches in one batch exceed the largest vision bucket {largest}: "
            f"encoded in {chunks} chunks of {largest} patches"
        )
        t.notes += [note] if note not in t.notes else []
    pixels = _replicated(t.mesh, (layout.patch_order.shape[0], t.cfg.vision.patch_dim), np.float32)
    return {"pixels": pixels, "layout": _host(t.mesh, layout)}


def _prompt_batch(t: Target, count: int, length: int, shares: int) -> dict:
    """Abstract `left_padded_batch` of `count` prompts of `length` tokens; shares > 0: each
    prompt shows an image, `shares` consecutive prompts the same one."""
    i32 = lambda *shape: _replicated(t.mesh, shape, np.int32)
    batch = dict(
        input_ids=i32(count, length),
        positions=i32(3, count, length),
        attention_mask=i32(count, length),
        next_pos=i32(count),
    )
    if shares:
        batch.update(_vision(t, [i // shares for i in range(count)]))
    return batch


def _sequence_batch(t: Target, rows: int, length: int, shown: list[int] | None, segments: bool) -> SequenceBatch:
    """Abstract SequenceBatch [rows, length] (images `shown`, see `_vision`; segment ids when packed)."""
    i32 = lambda *shape: _replicated(t.mesh, shape, np.int32)
    vision = _vision(t, shown) if shown else {"pixels": None, "layout": None}
    seg = i32(rows, length) if segments else None
    return SequenceBatch(i32(rows, length), i32(rows, length), i32(3, rows, length), **vision, segment_ids=seg)


def _key(mesh: Mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return _replicated(mesh, key.shape, key.dtype)


def _dropout(t: Target) -> lora.Dropout | None:
    """The LoRA dropout a gradient program takes: an abstract key at lora.dropout > 0 (the same
    program for every step), else None (the program without dropout)."""
    return lora.Dropout(_key(t.mesh), t.c.lora.dropout) if t.c.lora.dropout else None


def _cache(t: Target, sh: dict) -> KVCache | pages.Pages:
    """The sampler's decode cache (keys and values, every layer stacked: [Y, W, S, K, H]; with
    an int8 cache their scales [Y, W, K, S]), sharded as `empty_cache` constrains it; paged
    (sampling.page_size): the pool, table and page counts `pages.empty` makes (under the mesh)."""
    abstract = lambda shape, dtype, axes: jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.named_sharding(axes, shape, t.mesh, t.rules)
    )
    dtype, kv_dtype = t.cfg.compute_dtype, t.c.sampling.kv_cache_dtype
    kv = lambda rows, entries: KVCache(
        **{
            name: abstract(shape, dtype, axes)
            for name, (axes, shape, dtype) in cache_shapes(t.cfg.text, rows, entries, dtype, kv_dtype).items()
        }
    )
    if not sh["page"]:
        return kv(sh["slots"], sh["entries"])
    shards, w, i32 = sharding.axis_shards("batch"), sh["slots"], np.int32
    per_shard = sh["pages"] // shards
    table = abstract((w, sh["entries"] // sh["page"]), i32, ("batch", None))
    return pages.Pages(
        cache=PagedCache(kv(shards * (per_shard + 1), sh["page"]), table),
        refs=abstract((shards, per_shard + 1), i32, (None, None)),
        owed=abstract((w,), i32, ("batch",)),
        prompt=abstract((sh["q"], shards, sh["prompt_pages"]), i32, (None, None, None)),
    )


def chip_bytes(tree) -> int:
    """Bytes of an abstract tree on the fullest chip (each leaf's shard under its sharding)."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


# ---------------------------------------------------------------- compiling
@dataclasses.dataclass
class Session:
    """Compiles programs one by one, keeping their figures and the shardings of their outputs."""

    t: Target
    chip: Chip
    results: list[dict] = dataclasses.field(default_factory=list)
    seen: dict = dataclasses.field(default_factory=dict)  # (function, lowered text) -> result: one program
    grads: object = None  # the GRPO gradient's abstract outputs (compile_all sets them)
    only: frozenset[str] = frozenset()  # --compile_programs: compile these only (empty: all)

    def run(self, p: Program):
        """Compiles `p` and records its figures; returns its outputs as abstract arrays with the
        shardings the compiler chose (a program that does not compile: as lowered, replicated;
        one left out by `only`: traced for its output shapes, replicated)."""
        if self.only and p.name not in self.only:
            self.results.append(dict(name=p.name, phase=p.phase, kind=p.kind, runs=p.runs, skipped=True))
            return jax.tree.map(lambda x: _replicated(self.t.mesh, x.shape, x.dtype), p.fn.eval_shape(*p.args))
        lowered = p.fn.lower(*p.args)
        key = (id(p.fn), lowered.as_text())
        if key in self.seen:  # the run's jit cache reuses this program too
            same = self.seen[key]
            self.results.append(dict(same, name=p.name, runs=p.runs, phase=p.phase, beside=list(p.beside)))
            self.results[-1]["same_as"] = same["name"]
            return self.seen[key]["_out"]
        start = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # XLA's RESOURCE_EXHAUSTED and the like: the program does not fit
            result = dict(name=p.name, phase=p.phase, kind=p.kind, runs=p.runs, error=str(e).strip().splitlines()[0])
            result["_out"] = jax.tree.map(lambda x: _replicated(self.t.mesh, x.shape, x.dtype), lowered.out_info)
        else:
            result = _figures(p, compiled, time.perf_counter() - start, self.chip)
            if result["flops"] is None:  # XLA's CUDA compiler without a GPU gives no cost analysis
                result.update(_lowered_cost(lowered, compiled, self.t.mesh.size, self.chip))
                note = (
                    "no cost analysis from the compiled programs: flops are the lowered program's (XLA's analysis "
                    "before optimization) over the devices, bytes accessed each argument read and each output "
                    "written once; both lower bounds"
                )
                self.t.notes += [note] if note not in self.t.notes else []
            result["_out"] = compiled.out_info
        self.seen[key] = result
        self.results.append(result)
        done = f"does not compile: {result['error']}" if "error" in result else "compiled"
        print(f"{p.name}: {done} ({time.perf_counter() - start:.1f} s)", flush=True)  # 3b/7b: minutes each
        return result["_out"]


def _figures(p: Program, compiled, seconds: float, chip: Chip) -> dict:
    """A compiled program's per-chip figures (the module docstring says which)."""
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device
    flops, accessed = (float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))) if cost else (None, None)
    own = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
        + m.generated_code_size_in_bytes
    )
    return dict(
        name=p.name,
        phase=p.phase,
        kind=p.kind,
        runs=p.runs,
        compile_s=seconds,
        argument_bytes=m.argument_size_in_bytes,
        output_bytes=m.output_size_in_bytes,
        alias_bytes=m.alias_size_in_bytes,
        temp_bytes=m.temp_size_in_bytes,
        code_bytes=m.generated_code_size_in_bytes,
        own_bytes=own,
        beside=list(p.beside),
        flops=flops,
        bytes_accessed=accessed,
        roofline_s=_roofline(flops, accessed, chip),
    )


def _roofline(flops: float | None, accessed: float | None, chip: Chip) -> float | None:
    return None if flops is None else max(flops / chip.bf16_flops, accessed / chip.hbm_bytes_per_s)


def _lowered_cost(lowered, compiled, devices: int, chip: Chip) -> dict:
    """Flops and bytes accessed per chip where the compiled program has no cost analysis: the
    whole lowered program's flops (XLA's cost analysis of the HLO before optimization, on the
    host's CPU backend, since jax's Lowered.cost_analysis refuses a plugin's) shared evenly by
    the devices, and as bytes each argument read and each output written once."""
    from jax._src.lib import _jax

    cpu = jax.devices("cpu")[0].client
    whole = _jax.hlo_module_cost_analysis(cpu, lowered.compiler_ir("hlo").as_hlo_module())
    # the analysis gives a few negative flops to some programs, and none (no key) to one without
    # arithmetic, e.g. the slots' gathers and scatters at one device
    flops = max(float(whole.get("flops", 0.0)), 0.0) / devices
    m = compiled.memory_analysis()
    accessed = float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    return dict(flops=flops, bytes_accessed=accessed, roofline_s=_roofline(flops, accessed, chip))


# ---------------------------------------------------------------- the programs
@dataclasses.dataclass(frozen=True)
class Generate:
    """One kind of `Sampler.generate` call the run makes: `calls` per GRPO step or evaluation,
    `prompts` prompts with n samples each, of up to `prompt_len` tokens; shares > 0: each prompt
    shows an image, `shares` consecutive prompts the same one (0: text prompts)."""

    name: str
    phase: str
    calls: int
    prompts: int
    n: int
    max_new: int
    params: SamplingParams
    shares: int
    prompt_len: int

    def shapes(self, sampler) -> dict:
        """The shapes `Sampler.generate` runs this call at (`Sampler.layout`): prompt bucket P,
        generation bucket G, prompts per prefill group Q, groups, decode slots W, output rows."""
        lay = sampler.layout(self.prompts, self.prompt_len, self.n, self.max_new)
        return dict(
            p_len=lay.p_len,
            g_len=lay.g_len,
            rows=self.prompts * self.n,
            q=lay.group_prompts,
            groups=lay.groups,
            slots=lay.slots,
            out_rows=lay.out_rows,
            entries=lay.entries,
            page=lay.page,
            prompt_pages=lay.prompt_pages,
            pages=lay.pages,
        )


def generates(t: Target) -> list[Generate]:
    """The generate calls of a GRPO step (rollout, reflections) and of an evaluation."""
    c, st = t.c, t.settings
    rows = c.rl.rollout_batch * st.num_generations
    limit = c.rl.max_prompt_len
    out = [
        Generate(
            "rollout", "grpo", 1, c.rl.rollout_batch, st.num_generations, st.max_response_len, st.rollout, 1, limit
        )
    ]
    r = t.task.reflection
    for side in ("text", "image") if t.task.reflects else ():
        if rewards.runs(c.reward.reflection, side):
            # An image reflection cut as the official run's passes the limit by its image's tokens.
            shares, longest = (st.num_generations, longest_reflection_prompt(c)) if side == "image" else (0, limit)
            out.append(Generate(f"{side}_reflection", "grpo", 1, rows, 1, r.max_new, r.params, shares, longest))
    batches = -(-c.eval.num_examples // c.eval.batch_size)
    sampled = SamplingParams(temperature=c.eval.sampled_temperature, top_p=c.eval.sampled_top_p)
    for name, params in (("eval_greedy", GREEDY), ("eval_sampled", sampled)):
        out.append(Generate(name, "eval", batches, c.eval.batch_size, 1, c.rl.max_response_len, params, 1, limit))
    return out


def _cache_name(shapes: dict) -> str:
    paged = f" in {shapes['pages']} pages of {shapes['page']}" if shapes["page"] else ""
    return f"kv_cache {shapes['slots']}x{shapes['entries']}{paged}"


def _generate_programs(s: Session, g: Generate, caches: dict) -> None:
    """Prefill, slots and decode of one kind of generate call; the decode's runs are its loop
    iterations with every row running to max_new tokens in `slots` rows at a time."""
    t, sampler = s.t, s.t.rt.sampler
    sh = g.shapes(sampler)
    own = _cache_name(sh)
    alive = ("params", "optimizer", "reference") + (("rollout",) if t.rollout is not None else ())
    # The reflections run on the reference's weights when it is the judge, the rest on the
    # rollout copy when there is one; the weights a program reads are its argument, the rest
    # of the resident state lies beside it.
    if g.name.endswith("_reflection") and t.c.reward.judge == "reference":
        weights, held = t.ref, "reference"
    elif t.rollout is not None:
        weights, held = t.rollout, "rollout"
    else:
        weights, held = t.params, "params"
    state = tuple(k for k in alive if k != held)
    batch = _prompt_batch(t, sh["q"], sh["p_len"], g.shares)
    args, runs = (t.graphdef, weights, batch), g.calls * sh["groups"]
    prefill = Program(f"{g.name}_prefill", sampler._prefill, args, runs, state, g.phase, "sampler")
    pre = s.run(prefill)
    carry = s.run(
        Program(
            f"{g.name}_slots",
            sampler._fresh,
            (sh["slots"], sh["out_rows"], sh["g_len"], t.rt.pad_id),
            g.calls,
            alive,
            g.phase,
            "sampler",
        )
    )
    i32 = lambda *shape: _replicated(t.mesh, shape, np.int32)
    rows = GroupRows(i32(sh["q"] * g.n), i32(), i32(), _replicated(t.mesh, (), np.bool_))
    vocab = t.cfg.text.vocab_size
    draw = Draw(i32(len(sampler.stop_ids)), _replicated(t.mesh, (vocab,), np.float32), _key(t.mesh), i32())
    settings = Settings(g.n, g.params, sampler.continuous)
    args = (t.graphdef, settings, weights, caches[own], carry, pre, rows, draw)
    steps = g.calls * -(-sh["rows"] // sh["slots"]) * g.max_new
    s.run(Program(f"{g.name}_decode", sampler._decode, args, steps, state, g.phase, "sampler"))


def _rollout_weights_programs(s: Session) -> None:
    """The rollout copy made from the params: once per GRPO step (before the rollouts) and once
    per evaluation, beside the optimizer state and the reference (the gradient accumulator is
    gone by then)."""
    t = s.t
    for name, phase in (("rollout_weights", "grpo"), ("eval_rollout_weights", "eval")):
        s.run(Program(name, t.copy_fn, (t.params,), 1, ("optimizer", "reference"), phase, "rollout_weights"))


def _micro_batch(t: Target) -> tuple:
    """A micro-batch of full-length rows as the update sees it, packed into rl.pack_length
    sequences as `packing.plan` packs them (or padded to the buckets): (batch, log-prob
    function and its static arguments, gradient function), the learner's own jitted ones."""
    c, st, learner = t.c, t.settings, t.learner
    m, n = st.micro_batch, st.num_generations
    firsts = range(0, c.rl.rollout_batch * n, m)
    shown = max(([(r + i) // n - r // n for i in range(m)] for r in firsts), key=lambda x: x[-1])  # most images
    if st.micro_batch_weighting == "per_device_mean":  # rows by length (rl/balance.py): any prompts
        shown = [i % c.rl.rollout_batch for i in range(m)]
    g_len = bucket(c.rl.max_response_len, c.sampling.gen_buckets, "rl.max_response_len")
    if not st.packing:
        p_len = bucket(c.rl.max_prompt_len, st.prompt_buckets, "rl.max_prompt_len")
        batch = _sequence_batch(t, m, p_len + g_len, shown, False)
        return batch, learner._logprobs, (p_len - 1, g_len), learner.grpo_grad_fn(p_len - 1, g_len, st.loss)
    row = c.rl.max_prompt_len + c.rl.max_response_len
    packs = packing.plan([row] * m, st.pack_length, sharding.axis_shards("batch"))
    width = packing.score_width(max(len(p) for p in packs) * c.rl.max_response_len, st.pack_length)
    i32 = lambda *shape: _replicated(t.mesh, shape, np.int32)
    rows = _sequence_batch(t, len(packs), st.pack_length, shown, True)
    batch = PackedBatch(rows, i32(len(packs), width), i32(m, g_len))
    return batch, learner._packed_logprobs, (), learner.packed_grpo_grad_fn(st.loss)


def _update_programs(s: Session) -> dict:
    """Log-probs (reference and old), gradient, accumulation and optimizer step of a GRPO
    update; returns the gradient's abstract outputs (the accumulator's shardings)."""
    t, st = s.t, s.t.settings
    rows = t.c.rl.rollout_batch * st.num_generations
    micro, per_step = rows // st.micro_batch, st.update_batch * st.num_generations // st.micro_batch
    batch, logp_fn, static, grad_fn = _micro_batch(t)
    # Reference log-probs, and the old ones when recomputed: one program while the reference has
    # the params' dtype, one per weights' dtype when it has its own.
    old = micro if st.recompute_old_logprobs else 0
    if config_lib.reference_dtype(t.c) == t.c.model.param_dtype:
        passes = [("logprobs", t.params, old + micro)]
    else:
        passes = [("logprobs", t.params, old), ("reference_logprobs", t.ref, micro)]
    for name, weights, runs in passes:
        if runs:
            program = Program(
                name, logp_fn, (weights, batch, *static), runs, ("optimizer", "reference"), "grpo", "learner"
            )
            logp = s.run(program)
    f32 = lambda *shape: _replicated(t.mesh, shape, np.float32)
    args = (t.params, batch, logp, logp, f32(st.micro_batch), f32(*logp.shape), 1.0, _dropout(t))
    held = ("optimizer", "reference") + (("gradients",) if per_step > 1 else ())
    grads, _ = s.run(Program("gradient", grad_fn, args, micro, held, "grpo", "learner"))
    if per_step > 1:
        beside = ("params", "optimizer", "reference")
        s.run(Program("accumulate", t.learner._add, (grads, grads), micro - micro // per_step, beside, "grpo", "state"))
    args = (t.learner.trained(t.params), t.opt, grads, f32())
    s.run(Program("optimizer_step", t.learner._apply, args, micro // per_step, ("reference",), "grpo", "state"))
    return grads


def _cold_start_programs(s: Session) -> None:
    """The cold start's gradient (SET answers, and the judge's batch when configured) and its
    optimizer step; rows padded to the largest bucket, every row with its record's image."""
    t, cs = s.t, s.t.c.cold_start
    tx, _ = make_optimizer(OptimizerSettings.from_config(t.c, "cold_start", max(cs.steps, 1)))
    learner = Learner(t.graphdef, tx, trainable=lora.trainable(t.c.lora.rank))
    length = max(*t.c.sampling.prompt_buckets, t.c.rl.max_prompt_len + t.c.rl.max_response_len)
    f32 = lambda *shape: _replicated(t.mesh, shape, np.float32)
    grad_fn = learner.sft_grad_fn()
    batches = [("cold_start_gradient", cs.batch_size, ())]
    if cs.judge_batch_size:  # the judge's questions are about the step's records: their images
        batches.append(("cold_start_judge_gradient", cs.judge_batch_size, ("gradients",)))
    grads = None
    for name, rows, held in batches:
        batch = _sequence_batch(t, rows, length, [i % cs.batch_size for i in range(rows)], False)
        out, _ = s.run(
            Program(
                name,
                grad_fn,
                (t.params, batch, f32(rows, length - 1), 1.0, _dropout(t)),
                1,
                ("optimizer",) + held,
                "cold_start",
                "cold_start",
            )
        )
        grads = grads or out
    s.run(
        Program(
            "cold_start_optimizer_step",
            learner._apply,
            (learner.trained(t.params), t.opt, grads, f32()),
            1,
            (),
            "cold_start",
            "cold_start",
        )
    )


def program_names(t: Target) -> list[str]:
    """The names of the programs `compile_all` compiles for `t`'s config, in its order."""
    names = ["rollout_weights", "eval_rollout_weights"] if t.copy_fn is not None else []
    names += [f"{g.name}_{part}" for g in generates(t) for part in ("prefill", "slots", "decode")]
    st = t.settings
    accumulates = st.update_batch * st.num_generations > st.micro_batch  # as _update_programs' per_step > 1
    names += ["logprobs", "gradient", *(["accumulate"] if accumulates else []), "optimizer_step"]
    if t.c.cold_start.steps:
        judge = ["cold_start_judge_gradient"] if t.c.cold_start.judge_batch_size else []
        names += ["cold_start_gradient", *judge, "cold_start_optimizer_step"]
    return names


def check_programs(t: Target, only: frozenset[str]) -> None:
    """Raises, listing the known names, when --compile_programs names a program the config has not."""
    known = program_names(t)
    unknown = sorted(only - set(known))
    if unknown:
        raise ValueError(f"--compile_programs: no program named {unknown} in this config; its programs: {known}")


# ---------------------------------------------------------------- the step
def compile_all(s: Session) -> None:
    """Every program of the run's config, under its mesh and rules."""
    t = s.t
    with sharding.use_mesh(t.mesh, t.rules):
        if t.copy_fn is not None:
            _rollout_weights_programs(s)
        for g in generates(t):
            _generate_programs(s, g, t.caches)
        s.grads = _update_programs(s)
        if t.c.cold_start.steps:
            _cold_start_programs(s)


def resident(s: Session) -> dict[str, int]:
    """Bytes per chip of what the run keeps on the chips across programs."""
    t = s.t
    # a LoRA run's reference: a copy of the adapters over the params' own base
    ref = chip_bytes(lora.adapters(t.ref)) if t.c.lora.rank else chip_bytes(t.ref)
    out = {"params": chip_bytes(t.params), "optimizer": chip_bytes(t.opt), "reference": ref}
    out["gradients"] = chip_bytes(s.grads)  # the accumulator: the gradient program's own output shardings
    if t.rollout is not None:  # while the step samples (the rollout and evaluation programs)
        out["rollout"] = chip_bytes(t.rollout)
    return out


def summary(s: Session, topology: str) -> dict:
    """The JSON's content: every program with its peak, the step's totals, the verdict."""
    t, chip, held = s.t, s.chip, resident(s)
    programs = []
    for r in s.results:
        r = {k: v for k, v in r.items() if k != "_out"}
        if "error" in r or "skipped" in r:
            r.update(peak_bytes_per_chip=None, flops=None, bytes_accessed=None, roofline_s=None)
        else:
            r["beside_bytes"] = sum(held[k] for k in r["beside"])
            r["peak_bytes_per_chip"] = r["own_bytes"] + r["beside_bytes"]
        programs.append(r)
    out = dict(
        topology=topology,
        devices=t.mesh.size,
        chip=dataclasses.asdict(chip),
        mesh=dict(t.mesh.shape),
        variant=t.c.hf_path or t.c.variant,
        resident_bytes_per_chip=held,
        params_bytes=sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(t.params)),  # all chips
        programs=programs,
        notes=t.notes,
    )
    out.update(_step(t, programs, chip))
    out.update(_verdict(programs, chip, topology))
    return out


def _step(t: Target, programs: list[dict], chip: Chip) -> dict:
    """Roofline seconds per GRPO step, its rollout, an evaluation and a cold-start step (None
    where a program of it did not compile, or there is none), and the PROJECTED tokens per
    second per chip they allow (every row at its prompt and response limits)."""

    def seconds(phase: str, prefix: str = ""):
        ps = [p for p in programs if p["phase"] == phase and p["name"].startswith(prefix)]
        if not ps or any(p["roofline_s"] is None for p in ps):
            return None
        return sum(p["roofline_s"] * p["runs"] for p in ps)

    c = t.c
    rows = c.rl.rollout_batch * c.rl.num_generations
    step_s, rollout_s = seconds("grpo"), seconds("grpo", "rollout_")
    per_chip = lambda tokens, s: tokens / s / t.mesh.size if s else None  # per device (v4: per TensorCore)
    return dict(
        step_roofline_s=step_s,
        rollout_roofline_s=rollout_s,
        eval_roofline_s=seconds("eval"),
        cold_start_step_roofline_s=seconds("cold_start"),
        projected_rollout_tokens_per_s_per_chip=per_chip(rows * c.rl.max_response_len, rollout_s),
        projected_step_tokens_per_s_per_chip=per_chip(rows * (c.rl.max_prompt_len + c.rl.max_response_len), step_s),
        easyr1_tokens_per_s_per_gpu=EASYR1_TOKENS_PER_S_PER_GPU,
    )


def _verdict(programs: list[dict], chip: Chip, topology: str) -> dict:
    """fits, the peak, and one line: `fits: yes`, or the program that does not fit, by how much,
    and the settings that shrink it."""
    failed = [p for p in programs if "error" in p]
    if any("skipped" in p for p in programs):  # a partial compile: no verdict on the whole
        return dict(fits=not failed, peak_bytes_per_chip=None, verdict=_partial_verdict(programs, failed, topology))
    peaks = [p for p in programs if p["peak_bytes_per_chip"] is not None]
    worst = max(peaks, key=lambda p: p["peak_bytes_per_chip"]) if peaks else None
    peak = worst["peak_bytes_per_chip"] if worst else None
    if failed:
        p = failed[0]
        why = p["error"].rstrip(".")
        line = f"fits: no: {p['name']} does not compile for {topology}: {why}; shrink it with {SHRINK[p['kind']]}"
    elif peak > chip.hbm_bytes:
        over = (peak - chip.hbm_bytes) / GiB
        line = (
            f"fits: no: {worst['name']} needs {peak / GiB:.2f} GiB per chip, {over:.2f} GiB more than the chip's "
            f"{chip.hbm_bytes / GiB:.0f} GiB HBM; shrink it with {SHRINK[worst['kind']]}"
        )
    else:
        line = f"fits: yes ({worst['name']} peaks at {peak / GiB:.2f} of {chip.hbm_bytes / GiB:.0f} GiB per chip)"
    return dict(fits=not failed and peak <= chip.hbm_bytes, peak_bytes_per_chip=peak, verdict=line)


def _partial_verdict(programs: list[dict], failed: list[dict], topology: str) -> str:
    done = [p["name"] for p in programs if "skipped" not in p]
    if failed:
        return f"compiled only {done} (--compile_programs): {failed[0]['name']} does not compile for {topology}"
    return f"compiled only {done} (--compile_programs): no verdict on the whole step"


def report(out: dict) -> str:
    """The table `main` prints: per program, per chip, then the step and the verdict."""
    chip, gib = out["chip"], lambda b: f"{b / GiB:9.2f}" if b is not None else f"{'-':>9}"
    mesh = " x ".join(f"{k}={v}" for k, v in out["mesh"].items())
    lines = [
        f"compile_for {out['topology']}: {out['variant']} on {out['devices']} devices, mesh {mesh}; per chip "
        f"{chip['hbm_bytes'] / GiB:.0f} GiB HBM, {chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"{chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s ({chip['source']})",
        f"{'program':34}{'runs':>9}{'compile_s':>10}{'arg GiB':>9}{'out GiB':>9}{'temp GiB':>9}{'code MiB':>9}"
        f"{'peak GiB':>9}{'GFLOP':>11}{'GB acc':>9}{'roofline_s':>12}",
    ]
    for p in out["programs"]:
        if "error" in p:
            lines.append(f"{p['name']:34}{p['runs']:>9}  does not compile: {p['error']}")
            continue
        if "skipped" in p:
            lines.append(f"{p['name']:34}{p['runs']:>9}  not compiled (--compile_programs)")
            continue
        same = f"  (= {p['same_as']})" if "same_as" in p else ""
        lines.append(
            f"{p['name']:34}{p['runs']:>9}{p['compile_s']:10.1f}{gib(p['argument_bytes'])}{gib(p['output_bytes'])}"
            f"{gib(p['temp_bytes'])}{p['code_bytes'] / 2**20:9.1f}{gib(p['peak_bytes_per_chip'])}"
            f"{p['flops'] / 1e9:11.1f}{p['bytes_accessed'] / 1e9:9.2f}{p['roofline_s']:12.3g}{same}"
        )
    held = ", ".join(f"{k} {v / GiB:.2f}" for k, v in out["resident_bytes_per_chip"].items())
    lines += [
        f"resident per chip (GiB): {held}",
        f"peak HBM per chip: {gib(out['peak_bytes_per_chip']).strip()} GiB of {chip['hbm_bytes'] / GiB:.0f} GiB",
        f"roofline (a lower bound; -: a program of it did not compile) per GRPO step {_secs(out['step_roofline_s'])} "
        f"(rollout {_secs(out['rollout_roofline_s'])}), per evaluation {_secs(out['eval_roofline_s'])}, "
        f"per cold-start step {_secs(out['cold_start_step_roofline_s'])}",
        "PROJECTED at the roofline (an upper bound, not a measurement): "
        f"{_rate(out['projected_rollout_tokens_per_s_per_chip'])} rollout tokens/s/chip, "
        f"{_rate(out['projected_step_tokens_per_s_per_chip'])} step tokens/s/chip (prompt + response); "
        f"EasyR1 measured {out['easyr1_tokens_per_s_per_gpu']:,} tokens/s/GPU (8 x H100)",
    ]
    lines += [f"note: {n}" for n in out["notes"]]
    return "\n".join(lines + [out["verdict"]])


def _rate(x) -> str:
    return f"{x:,.0f}" if x is not None else "-"


def _secs(x) -> str:
    return f"{x:.3g} s" if x is not None else "-"


def output_path(c: ConfigDict, topology: str, slices: int) -> str:
    """<workdir>/compile/<topology>.json (':' as '_'; several slices: a x<slices> suffix)."""
    name = topology.replace(":", "_") + (f"x{slices}" if slices > 1 else "")
    return paths.join(c.workdir, "compile", f"{name}.json")


def main(c: ConfigDict, topology: str, slices: int = 1, only: frozenset[str] = frozenset()) -> int:
    """`--compile_for=<topology>`: compile, print the table, write the JSON; 0 when it fits, else 1.

    `only` (--compile_programs): compile those programs only, the others traced for their
    shapes; exit 0 when those compile (the step then has no roofline and no verdict)."""
    if not jax.config.jax_platforms:  # libtpu installed without chips: the host needs no TPU backend
        jax.config.update("jax_platforms", "cpu")
    chip, devices = chip_of(topology), topology_devices(topology, slices)
    if is_gpu(topology):
        chip = chip.preallocated(c.gpu_memory_fraction)
    cores = 1 + max(getattr(d, "core_on_chip", 0) for d in devices)
    scratch = paths.Scratch(c.scratch_dir)
    try:
        t = target(c, devices, scratch)
        check_programs(t, only)
        s = Session(t, chip.per_device(cores), only=only)
        if cores > 1:
            s.t.notes.append(f"each chip is {cores} devices (TensorCores): figures are per device")
        compile_all(s)
    finally:
        scratch.close()
    out = summary(s, topology)
    path = output_path(c, topology, slices)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    print(report(out), flush=True)  # its last line: the verdict
    return 0 if out["fits"] else 1
