"""The dry run's per-device memory against hand counts from the Qwen2.5-VL presets.

Each case runs in a subprocess: the dry run fakes its own device count (64 or 8), which a
process that already started JAX (this one, with conftest's 8 devices) cannot do.
"""

import json
import os
import subprocess
import sys

import pytest

from emor3_jax.models.qwen25_vl.config import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3
FP32 = 4


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _memory(
    variant: str,
    devices: int,
    mesh: tuple,
    max_rows: int = 0,
    rollout: tuple = (),
    cut: str = "",
    lora: int = 0,
    kv: str = "",
    paged: tuple = (),
) -> tuple[dict, str]:
    """dry_run.main for configs/qwen_vl.py:<variant> (rollout: (rl.rollout_dtype,
    rl.rollout_sharding), cut: reward.reflection_cut, else the variant's; lora: lora.rank; kv:
    sampling.kv_cache_dtype; paged: (sampling.page_size, sampling.kv_pages)); (the returned
    numbers, the printed report)."""
    set_rollout = f"c.rl.rollout_dtype, c.rl.rollout_sharding = {rollout!r}\n" if rollout else ""
    set_rollout += f"c.reward.reflection_cut = {cut!r}\n" if cut else ""
    set_rollout += f"c.lora.rank = {lora}\n" if lora else ""
    set_rollout += f"c.sampling.kv_cache_dtype = {kv!r}\n" if kv else ""
    set_rollout += f"c.sampling.page_size, c.sampling.kv_pages = {paged!r}\n" if paged else ""
    script = (
        "import json; from configs.qwen_vl import get_config; from emor3_jax import dry_run\n"
        f"c = get_config({variant!r}); c.mesh = {mesh!r}; c.sampling.max_rows = {max_rows}\n"
        f"{set_rollout}"
        f"m = dry_run.main(c, {devices})\n"
        "print(json.dumps(m))\n"
    )
    out = _run(["-c", script])
    assert out.returncode == 0, out.stderr[-3000:]
    *report, last = out.stdout.strip().splitlines()
    return json.loads(last), "\n".join(report)


def param_elems_per_device(name: str, fsdp: int, tensor: int) -> tuple[int, int]:
    """(all parameters, parameters on one device) of a preset, counted by hand.

    Under DEFAULT_RULES: a kernel's embed-side dim goes over fsdp, its heads/mlp/vocab-side
    dim over tensor; 1-D biases follow their kernel's output axis; norms and the patch axis
    stay whole. Every dim here is divisible by the meshes used below.
    """
    cfg = preset(name)
    t, v = cfg.text, cfg.vision
    d, f, hd, e, vf = t.hidden_size, t.intermediate_size, t.head_dim, v.hidden_size, v.intermediate_size
    q, kv, merged = t.num_heads * hd, t.num_kv_heads * hd, e * v.merge_unit
    ft = fsdp * tensor
    parts = [  # (elements, divisor)
        (t.vocab_size * d, ft),  # embed_tokens [vocab, embed]
        (t.num_layers * (d * q + 2 * d * kv + q * d + 3 * d * f), ft),  # q/k/v/o + gate/up/down kernels
        (t.num_layers * (q + 2 * kv), tensor),  # q/k/v biases
        (t.num_layers * 2 * d + d, 1),  # decoder norms + final norm
        (v.patch_dim * e, fsdp),  # patch_embed [patch, vision_embed]
        (v.depth * (3 * e * e + e * e + 3 * e * vf), ft),  # qkv, proj, gate/up/down kernels
        (v.depth * (3 * e + 2 * vf), tensor),  # qkv and gate/up biases
        (v.depth * 2 * e, fsdp),  # proj and down biases [vision_embed]
        (v.depth * 2 * e + e, 1),  # block norms + merger ln_q
        (merged * merged, ft),  # merger fc1 [vision_mlp, vision_embed]
        (merged, fsdp),  # fc1 bias [vision_embed]
        (merged * d, fsdp),  # fc2 [vision_embed, embed]: fsdp taken by its first dim
        (d, fsdp),  # fc2 bias [embed]
    ]
    if not cfg.tie_word_embeddings:
        parts.append((d * t.vocab_size, ft))  # lm_head [embed, vocab]
    for n, k in parts:
        assert n % k == 0, (n, k)
    return sum(n for n, _ in parts), sum(n // k for n, k in parts)


def _check(m: dict, name: str, fsdp: int, tensor: int, kv_gib: float, rollout: int) -> None:
    """`rollout`: the rollout copy's bytes per device, by hand."""
    total, per_device = param_elems_per_device(name, fsdp, tensor)
    assert m["num_params"] == total
    pd, gl = m["per_device"], m["global"]
    assert pd["params"] == FP32 * per_device
    assert gl["params"] == FP32 * total
    assert pd["gradients"] == pd["params"]
    assert 2 * pd["reference"] == pd["params"]  # a bf16 copy (rl.reference_dtype, as the official run)
    # AdamW: two fp32 moments in the params' shardings, plus two int32 step counters (replicated).
    assert pd["optimizer"] == 2 * pd["params"] + 2 * 4
    assert pd["kv_cache"] == kv_gib * GiB
    assert pd["rollout"] == rollout
    for k in pd:
        assert pd[k] * m["devices"] >= gl[k], k  # every byte lives somewhere (replicas count more)
    assert pd["total"] == sum(pd[k] for k in ("params", "optimizer", "reference", "gradients", "rollout", "kv_cache"))
    assert m["fallbacks"] == []


def test_7b_on_64_devices_fsdp16_tensor4():
    m, report = _memory("7b", 64, (("data", 1), ("fsdp", 16), ("tensor", 4)))
    assert m["num_params"] == 8_292_166_656  # Qwen2.5-VL-7B-Instruct's published count
    # K and V, 28 layers stacked: 4096 rows / fsdp 16 x 4 kv heads / tensor 4 x 128 x 6144 slots x 2
    # bytes: the image reflection's cache (a 4096 prompt bucket + 2048), the largest of the step.
    # the 7b default rollout copy: bf16 in the params' fsdp layout, half their bytes
    _check(m, "7b", 16, 4, kv_gib=28 * 2 * 256 * 1 * 128 * 6144 * 2 / GiB, rollout=m["per_device"]["params"] // 2)
    assert m["per_device"]["params"] < m["global"]["params"] / 64 * 1.02  # all but 1% of it split 64 ways
    assert "activations" in report and "not included" in report
    assert "GiB/device" in report and "fsdp=16" in report


def test_7b_with_lora_keeps_a_bf16_base_and_adapter_sized_optimizer_state():
    """lora.rank=64 on the language model's attention and MLP (the default targets), 8 devices:
    the base in bf16, gradients and AdamW moments only for the adapters (counted by hand), the
    reference a copy of the adapters alone (over the base itself)."""
    mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))
    full, _ = _memory("7b", 8, mesh)
    m, _ = _memory("7b", 8, mesh, lora=64)
    t, r = preset("7b").text, 64
    d, q, kv, f = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.intermediate_size
    # (in + out) * r per adapted projection: q, k, v, o, gate, up, down
    adapters = t.num_layers * r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    pd, gl = m["per_device"], m["global"]
    assert gl["gradients"] == FP32 * adapters
    # Per device: an adapter shards on its kernel's axis only (r never), and the default rules put
    # only `embed` over fsdp: A of q/k/v/gate/up and B of o/down split 8 ways, the rest whole.
    split, whole = 7 * d // 8, 2 * q + 2 * kv + 3 * f
    assert pd["gradients"] == FP32 * t.num_layers * r * (split + whole)
    assert pd["optimizer"] == 2 * pd["gradients"] + 2 * 4  # two fp32 moments + two int32 counters
    assert gl["params"] == 2 * full["num_params"] + FP32 * adapters  # the bf16 base and the fp32 adapters
    assert pd["reference"] == pd["gradients"]  # a copy of the adapters over the base itself
    state = lambda x: sum(x[k] for k in ("params", "optimizer", "reference", "gradients"))  # the KV cache aside
    assert state(pd) < state(full["per_device"]) / 4  # 4.49 vs 18.67 GB
    assert pd["kv_cache"] == full["per_device"]["kv_cache"]


def test_3b_on_8_devices_pure_fsdp():
    m, report = _memory("3b", 8, (("data", 1), ("fsdp", -1), ("tensor", 1)))
    assert m["num_params"] == 3_754_622_976  # Qwen2.5-VL-3B-Instruct's published count (tied embeddings)
    assert m["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # the 3b default rollout copy: bf16, every parameter on every device
    _check(m, "3b", 8, 1, kv_gib=36 * 2 * 512 * 2 * 128 * 6144 * 2 / GiB, rollout=2 * 3_754_622_976)
    assert "rollout" in report and "(bfloat16, replicated)" in report
    # 1000 decode slots (continuous batching; not a multiple of num_generations=8): the cache
    # holds 1000 rows, 125 per device.
    m, report = _memory("3b", 8, (("data", 1), ("fsdp", -1), ("tensor", 1)), max_rows=1000)
    assert m["kv_rows"] == 1000
    assert m["per_device"]["kv_cache"] == 36 * 2 * 125 * 2 * 128 * 6144 * 2
    assert "1000 decode slots x 6144 entries, bfloat16 (image_reflection)" in report


def test_the_kv_cache_is_the_image_reflections_when_it_counts_its_image_as_one_token():
    """3b's default 256 decode slots: the official cut lets an image reflection reach
    2 * 2048 - 3 tokens, a 4096 prompt bucket + 2048 generated = 6144 entries; with
    reward.reflection_cut="expanded" every prompt stays within 2048 and the rollout's 4096
    entries are the largest."""
    mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))
    per_entry = 36 * 2 * (256 // 8) * 2 * 128 * 2  # K and V, 36 layers, 32 slots per device, bf16
    m, _ = _memory("3b", 8, mesh, max_rows=256)
    assert (m["kv_call"], m["kv_slots"], m["per_device"]["kv_cache"]) == ("image_reflection", 6144, per_entry * 6144)
    m, _ = _memory("3b", 8, mesh, max_rows=256, cut="expanded")
    assert (m["kv_call"], m["kv_slots"], m["per_device"]["kv_cache"]) == ("rollout", 4096, per_entry * 4096)


def test_a_paged_kv_cache_counts_the_pool_the_sampler_would_allocate():
    """3b, 256 slots over fsdp 8, pages of 128. The image reflection's rows share nothing: 32
    slots per device x (32 prompt + 16 token pages) + one prompt's 32 = 1,568 pages and a spare
    per device, against the rollout's 32 x 32 + 16 = 1,040; kv_pages=4800 caps it at 600 + 1."""
    mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))
    per_page = 36 * 2 * 128 * 2 * 128 * 2  # K and V, 36 layers, 128 entries, 2 kv heads x 128, bf16
    m, report = _memory("3b", 8, mesh, max_rows=256, paged=(128, 0))
    assert (m["kv_call"], m["kv_rows"], m["kv_slots"]) == ("image_reflection", 8 * 1569, 128)
    assert m["per_device"]["kv_cache"] == 1569 * per_page
    assert "12552 pages of 128 entries (paged), bfloat16 (image_reflection)" in report
    m, _ = _memory("3b", 8, mesh, max_rows=256, paged=(128, 4800))
    assert (m["kv_rows"], m["per_device"]["kv_cache"]) == (8 * 601, 601 * per_page)


def test_an_int8_kv_cache_counts_one_byte_per_element_plus_an_fp32_scale_per_entry_and_kv_head():
    """3b, 256 slots over fsdp 8 (32 per device), 6144 entries: K and V of 36 layers x 2 kv heads
    x 128 dims in int8, plus 2 kv heads' fp32 scales each: (128 + 4) / 256 of the bf16 cache."""
    m, report = _memory("3b", 8, (("data", 1), ("fsdp", -1), ("tensor", 1)), max_rows=256, kv="int8")
    assert m["per_device"]["kv_cache"] == 36 * 2 * 32 * 2 * (128 * 1 + 4) * 6144
    assert "256 decode slots x 6144 entries, int8 + fp32 scales (image_reflection)" in report


def test_the_rollout_copy_in_the_tensor_layout_and_without_one():
    """7b on fsdp 4 x tensor 2: a tensor-layout copy splits heads / mlp / vocab over tensor and
    nothing over fsdp, so per device it is the hand count at fsdp 1, tensor 2, in bf16; without
    a copy it counts nothing."""
    mesh = (("data", 1), ("fsdp", 4), ("tensor", 2))
    m, _ = _memory("7b", 8, mesh, rollout=("bfloat16", "tensor"))
    _, per_device = param_elems_per_device("7b", 1, 2)
    assert m["per_device"]["rollout"] == 2 * per_device
    m, report = _memory("7b", 8, mesh, rollout=("", "fsdp"))
    assert m["per_device"]["rollout"] == 0 and "(none)" in report


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dry_run=8", "--config.mesh=[('data',1),('fsdp',4),('tensor',1)]"], "--config.mesh="),
        (["--dry_run=-2"], "--dry_run=-2: give the target's global device count"),
    ],
)
def test_bad_topology_names_the_flag(args, message):
    out = _run(["-m", "emor3_jax.train", "--config=configs/qwen_vl.py:3b", *args])
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    if "--config.mesh=" in message:  # the CLI list parsed and the 8 fake devices took effect
        assert "needs 4 devices, have 8" in out.stderr and "global device count" in out.stderr
