"""compile_for: the tiny preset's programs compiled for a TPU slice (v5e:2x2, four chips) by
libtpu on this CPU, at shrunk shapes so the compiles take seconds each.

One compile session is shared by the module (in this process: the topology's compile-only
devices do not touch the CPU backend conftest set up).
"""

import contextlib
import io
import json

import jax
import numpy as np
import pytest

from configs.qwen_vl import get_config
from emor3_jax import compile_for

pytest.importorskip("libtpu", reason="compile_for needs libtpu (the test extra installs it)")
# pytest-xdist (-n 2 --dist loadfile) runs a file's tests on one worker: they share one compile.
TOPOLOGY = "v5e:2x2"


def small_tiny(workdir) -> object:
    """The tiny preset at small shapes: every kind of program, each quick to compile."""
    c = get_config("tiny")
    c.workdir = str(workdir)
    c.rl.rollout_batch, c.rl.num_generations, c.rl.update_batch, c.rl.micro_batch = 2, 2, 1, 1
    c.rl.max_prompt_len, c.rl.max_response_len, c.rl.pack_length = 96, 32, 128
    c.sampling.prompt_buckets, c.sampling.gen_buckets = (96,), (32,)
    c.eval.batch_size, c.eval.num_examples = 2, 2
    c.cold_start.steps, c.cold_start.batch_size, c.cold_start.judge_batch_size = 1, 2, 2
    return c


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """(config, exit status, printed text, JSON) of `compile_for.main` on the small tiny config."""
    c = small_tiny(tmp_path_factory.mktemp("compile_for"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = compile_for.main(c, TOPOLOGY)
    with open(compile_for.output_path(c, TOPOLOGY, 1)) as f:
        return c, status, out.getvalue(), json.load(f)


EXPECTED = [
    "rollout_prefill",
    "rollout_slots",
    "rollout_decode",
    "text_reflection_prefill",
    "image_reflection_prefill",
    "eval_greedy_decode",
    "eval_sampled_decode",
    "logprobs",
    "gradient",
    "accumulate",
    "optimizer_step",
    "cold_start_gradient",
    "cold_start_judge_gradient",
    "cold_start_optimizer_step",
]


def test_every_program_compiles_and_fits(compiled):
    _, status, text, out = compiled
    names = [p["name"] for p in out["programs"]]
    assert set(EXPECTED) <= set(names), names
    assert status == 0 and out["fits"] is True
    assert out["devices"] == 4 and out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    for p in out["programs"]:
        assert {"name", "peak_bytes_per_chip", "flops", "bytes_accessed", "roofline_s"} <= set(p)
        assert "error" not in p, p
        assert 0 < p["peak_bytes_per_chip"] < 16 * 2**30
        # the peak holds the program's own bytes and what the run keeps beside it
        assert p["peak_bytes_per_chip"] >= p["argument_bytes"] + p["temp_bytes"]
    assert out["step_roofline_s"] > out["rollout_roofline_s"] > 0
    assert out["projected_step_tokens_per_s_per_chip"] > 0
    for name in EXPECTED:
        assert any(line.startswith(name) for line in text.splitlines()), name
    assert "PROJECTED" in text and "1,200 tokens/s/GPU" in text
    assert text.rstrip().splitlines()[-1].startswith("fits: yes")


def test_the_gradient_is_sharded_like_the_params(compiled):
    """Under fsdp over four chips, the gradient program returns each gradient in its
    parameter's sharding: a quarter per chip, not the whole on every chip."""
    _, _, _, out = compiled
    params = out["resident_bytes_per_chip"]["params"]  # the params' share per chip
    assert params * 3 < out["params_bytes"]  # they are sharded: about a quarter of all
    # the compiler's output shardings give the gradients exactly the params' share
    assert out["resident_bytes_per_chip"]["gradients"] == params
    # its output bytes (TPU layouts pad small arrays to tiles; plus scalar metrics) stay near
    # that share; a whole gradient per chip would be about four times as much
    for name in ("gradient", "cold_start_gradient"):
        grad = next(p for p in out["programs"] if p["name"] == name)
        assert params <= grad["output_bytes"] < 1.25 * params, (name, grad["output_bytes"], params)


def test_the_verdict_names_the_program_that_does_not_fit(compiled):
    """The same compiled programs against a chip made too small for them: exit status 1 and
    one line naming the program with the largest peak, by how much, and what shrinks it."""
    _, _, _, out = compiled
    worst = max(out["programs"], key=lambda p: p["peak_bytes_per_chip"])
    hbm = worst["peak_bytes_per_chip"] - 2**20  # 1 MiB short of the largest peak
    small = compile_for.Chip(hbm, 197e12, 819e9, "a test chip")
    verdict = compile_for._verdict(out["programs"], small, TOPOLOGY)
    assert verdict["fits"] is False
    line = verdict["verdict"]
    assert line.startswith(f"fits: no: {worst['name']} needs ") and "more than the chip's" in line
    assert "shrink it with" in line


def test_a_program_that_does_not_compile_fails_the_verdict():
    programs = [dict(name="gradient", kind="learner", error="RESOURCE_EXHAUSTED: over HBM", peak_bytes_per_chip=None)]
    v = compile_for._verdict(programs, compile_for.CHIPS["v5e"], TOPOLOGY)
    assert v["fits"] is False and v["verdict"].startswith("fits: no: gradient does not compile for v5e:2x2")
    assert "rl.micro_batch" in v["verdict"]


def test_unknown_topology_is_a_clear_error():
    with pytest.raises(ValueError, match="--compile_for=v5p:3x3x3x3"):
        compile_for.topology_devices("v5p:3x3x3x3")
    with pytest.raises(ValueError, match="no chip table for 'v9'"):
        compile_for.chip_of("v9:2x2")


def test_jax_still_runs_on_the_cpu():
    """libtpu installed beside the CPU suite: the backend stays the CPU's (conftest's JAX_PLATFORMS)."""
    assert jax.default_backend() == "cpu"
    assert float(np.asarray(jax.numpy.ones(2).sum())) == 2.0


def test_several_slices_and_v4_cores():
    """Two v5e:2x2 slices are 8 devices; libtpu's v4 topology shows each chip's two TensorCores
    as two devices, so a device gets half a chip's HBM, flops and bandwidth."""
    assert len(compile_for.topology_devices("v5e:2x2", slices=2)) == 8
    v4 = compile_for.topology_devices("v4:2x2x1")
    assert len(v4) == 8 and {d.core_on_chip for d in v4} == {0, 1}
    half = compile_for.CHIPS["v4"].per_device(2)
    assert half.hbm_bytes == 16 * 2**30 and half.bf16_flops == 137.5e12 and half.hbm_bytes_per_s == 600e9


def _hops(grid: np.ndarray) -> int:
    """The longest step, in chip-to-chip links, between neighbours along any mesh axis."""
    steps = [
        sum(abs(p - q) for p, q in zip(a.coords, b.coords))
        for axis in range(grid.ndim)
        for row in np.moveaxis(grid, axis, -1).reshape(-1, grid.shape[axis])
        for a, b in zip(row[:-1], row[1:])
    ]
    return max(steps)


def test_the_mesh_follows_the_chips():
    """On a v5e 4x4 slice, an fsdp x tensor = 4 x 4 mesh steps one link at a time along each
    axis; the devices in id order would put chips 4 links apart side by side."""
    from emor3_jax.core import sharding

    devices = compile_for.topology_devices("v5e:4x4")
    shape = [("data", 1), ("fsdp", 4), ("tensor", 4)]
    assert _hops(np.asarray(devices).reshape(1, 4, 4)) == 4
    mesh = sharding.make_mesh(shape, devices)
    assert _hops(mesh.devices) == 1 and sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    v4 = compile_for.topology_devices("v4:2x2x1")  # two TensorCores per chip: the devices' order
    assert [d.id for d in sharding.make_mesh(shape[:2] + [("tensor", 2)], v4).devices.flat] == [d.id for d in v4]


def test_several_slices_put_the_data_axis_across_slices():
    from emor3_jax.core import sharding

    devices = compile_for.topology_devices("v5e:2x2", slices=2)
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2), ("tensor", 1)], devices)
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of == np.array([0, 0, 1, 1])[:, None, None]).all()  # fsdp and tensor within a slice
    with pytest.raises(ValueError, match=r"data=1 over 2 slices: .*multiple of 2 \(e.g. --config.mesh="):
        sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], devices)


def test_a_batch_of_images_past_the_largest_bucket_is_compiled_in_chunks(tmp_path):
    """A rollout group of two prompts (two samples each) at a largest bucket of one image: the
    abstract vision inputs are laid out as the run lays them, in two chunks of that bucket, a
    note says so, and the tower's program at those shapes compiles."""
    from types import SimpleNamespace

    from flax import nnx

    from emor3_jax.core import sharding
    from emor3_jax.models.api import abstract_model
    from emor3_jax.models.qwen25_vl.config import preset

    c = small_tiny(tmp_path)
    c.model.vision_buckets = (16,)  # one 4x4-patch image (data.max_pixels = 56 * 56)
    cfg = preset("tiny", vocab_size=512, vision_buckets=(16,))
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:1])
    t = SimpleNamespace(c=c, cfg=cfg, mesh=mesh, notes=[])
    inputs = compile_for._vision(t, [0, 0, 1, 1])
    assert inputs["pixels"].shape == (2 * 16, cfg.vision.patch_dim)
    assert inputs["layout"].windows.index.shape[0] == 2
    assert t.notes == [
        "2 images of 4x4 patches in one batch exceed the largest vision bucket 16: encoded in 2 chunks of 16 patches"
    ]
    graphdef, state = nnx.split(abstract_model(cfg))
    tower = jax.jit(lambda s, pixels, layout: nnx.merge(graphdef, s).visual(pixels, layout))
    merged = tower.eval_shape(state, inputs["pixels"], inputs["layout"])
    assert merged.shape == (2 * 16 // 4, cfg.vision.out_hidden_size)
    assert tower.lower(state, inputs["pixels"], inputs["layout"]).compile().memory_analysis() is not None


def test_program_names_lists_what_compile_all_compiles(compiled):
    from emor3_jax.core import paths

    c, _, _, out = compiled
    scratch = paths.Scratch(c.scratch_dir)
    try:
        t = compile_for.target(c, compile_for.topology_devices(TOPOLOGY), scratch)
    finally:
        scratch.close()
    assert compile_for.program_names(t) == [p["name"] for p in out["programs"]]


def test_compile_programs_compiles_only_the_named_ones(tmp_path):
    """--compile_programs: the named programs compile, the others are listed as not compiled
    (traced for their shapes only); no verdict on the whole step. An unknown name is refused
    before anything compiles, listing the config's programs."""
    c = small_tiny(tmp_path)
    unknown = r"no program named \['gradiant'\] in this config; its programs: \[.*'gradient'"
    with pytest.raises(ValueError, match=unknown):
        compile_for.main(c, TOPOLOGY, only=frozenset({"gradiant"}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = compile_for.main(c, TOPOLOGY, only=frozenset({"optimizer_step"}))
    with open(compile_for.output_path(c, TOPOLOGY, 1)) as f:
        got = json.load(f)
    assert status == 0
    assert [p["name"] for p in got["programs"] if "skipped" not in p] == ["optimizer_step"]
    assert len(got["programs"]) > 1 and got["step_roofline_s"] is None
    text = out.getvalue()
    assert "rollout_decode" in text and "not compiled (--compile_programs)" in text
    last = text.rstrip().splitlines()[-1]
    assert last == "compiled only ['optimizer_step'] (--compile_programs): no verdict on the whole step"


def test_the_rollout_programs_take_the_rollout_copy(tmp_path):
    """With a bf16 replicated rollout copy: the copy's own program (params in, the whole model
    in bf16 out on each chip) comes first, the sampling programs read the copy instead of the
    params, which lie beside them with the rest of the state, and the update's programs never
    see the copy."""
    c = small_tiny(tmp_path)
    c.rl.rollout_dtype, c.rl.rollout_sharding, c.rl.recompute_old_logprobs = "bfloat16", "replicated", True
    only = frozenset({"rollout_weights", "rollout_prefill", "logprobs"})
    with contextlib.redirect_stdout(io.StringIO()):
        assert compile_for.main(c, TOPOLOGY, only=only) == 0
    with open(compile_for.output_path(c, TOPOLOGY, 1)) as f:
        out = json.load(f)
    names = [p["name"] for p in out["programs"]]
    assert names[:3] == ["rollout_weights", "eval_rollout_weights", "rollout_prefill"], names
    got = {p["name"]: p for p in out["programs"] if "skipped" not in p}
    whole = out["params_bytes"] // 2  # every parameter in bf16, on each chip
    assert out["resident_bytes_per_chip"]["rollout"] == whole
    copy, prefill, logprobs = got["rollout_weights"], got["rollout_prefill"], got["logprobs"]
    assert copy["output_bytes"] >= whole and copy["argument_bytes"] < out["params_bytes"] / 2  # fp32 shards in
    assert prefill["argument_bytes"] >= whole and "params" in prefill["beside"] and "rollout" not in prefill["beside"]
    assert logprobs["argument_bytes"] < whole and "rollout" not in logprobs["beside"]


def test_the_gradients_take_a_key_with_lora_dropout(tmp_path, monkeypatch):
    """lora.rank=8 with lora.dropout=0.1: the GRPO (packed) and cold-start gradients are traced
    with the adapters' dropout, its key an abstract argument (one program for every step's key).
    Traced for their shapes only (--compile_programs): compiling the packed gradient for the
    slice as well passes too, at 13 s more."""
    from emor3_jax.models import lora

    c = small_tiny(tmp_path)
    c.lora.rank, c.lora.dropout = 8, 0.1
    rates, drop = [], lora.drop
    monkeypatch.setattr(lora, "drop", lambda x, d: rates.append(d.rate) or drop(x, d))  # each traced mask
    with contextlib.redirect_stdout(io.StringIO()):
        assert compile_for.main(c, TOPOLOGY, only=frozenset({"optimizer_step"})) == 0
    assert rates and set(rates) == {0.1}


@pytest.mark.slow  # 10 to 20 minutes on 2 cores: every program of the real 3b step
def test_the_3b_step_compiles_for_a_v6e_8_and_fits(tmp_path):
    """The README's command for the real job, at its real shapes (the paper's batch, 256 decode
    slots, 2,048-token prompts and responses): every program compiles for v6e-8 and the step
    fits in its 32 GiB per chip (launch/README.md measured 22.4 GiB before the rollout copy, and
    27.7 GiB at the reflection decode with the 3b default's replicated bf16 copy)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "emor3_jax.train", "--config=configs/qwen_vl.py:3b", "--compile_for=v6e:2x4"]
    done = subprocess.run(
        [*cmd, f"--config.workdir={tmp_path}"],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root, XLA_FLAGS=""),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("fits: yes")
    report = json.loads((tmp_path / "compile" / "v6e_2x4.json").read_text())
    assert report["fits"] and report["peak_bytes_per_chip"] < report["chip"]["hbm_bytes"]
    names = {p["name"] for p in report["programs"] if "error" not in p}
    assert {"rollout_weights", "rollout_prefill", "rollout_decode", "gradient", "optimizer_step"} <= names
    assert "reference_logprobs" in names


def test_the_paged_decode_compiles_with_the_tpu_kernel(tmp_path):
    """sampling.page_size=128 with splash: the rollout and image reflection decode loops, paged
    and read by the live-span TPU kernel through the page table, lower and compile for the
    slice (Mosaic); the eval calls' 2 rows get spare slots up to one per shard."""
    c = small_tiny(tmp_path)
    c.sampling.prompt_buckets, c.sampling.page_size, c.model.attention_impl = (128,), 128, "splash"
    with contextlib.redirect_stdout(io.StringIO()):
        status = compile_for.main(c, TOPOLOGY, only=frozenset({"rollout_decode", "image_reflection_decode"}))
    with open(compile_for.output_path(c, TOPOLOGY, 1)) as f:
        got = json.load(f)
    assert status == 0
    done = {p["name"]: p for p in got["programs"] if "skipped" not in p}
    assert set(done) == {"rollout_decode", "image_reflection_decode"}
    assert all(p["temp_bytes"] >= 0 for p in done.values())
