"""compile_for on GPUs: `--compile_for=h100:N` / `h200:N` names, errors and chip table (CI,
without the CUDA plugin), and the small tiny config compiled for eight H200s by XLA's CUDA
compiler on this CPU (slow; needs the `compile-gpu` extra, several GB, not the test install).
"""

import contextlib
import importlib.util
import io
import json

import numpy as np
import pytest

from emor3_jax import compile_for, gpu_targets

CUDA_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and any(
    importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)
)
needs_cuda = pytest.mark.skipif(
    not CUDA_PLUGIN, reason="needs XLA's CUDA compiler: pip install -e '.[compile-gpu]' (jax[cuda12])"
)
pytestmark = pytest.mark.xdist_group("compile_for")
GiB = 2**30


def test_gpu_names_parse_into_chips_of_the_table():
    assert compile_for.is_gpu("h200:8") and compile_for.is_gpu("H100:4") and not compile_for.is_gpu("v5p:2x2x1")
    h100, h200 = compile_for.chip_of("h100:8"), compile_for.chip_of("h200:8")
    assert 79 * GiB < h100.hbm_bytes < 80 * GiB and 140 * GiB < h200.hbm_bytes < 141 * GiB
    assert h100.bf16_flops == h200.bf16_flops == 989.4e12
    assert h200.hbm_bytes_per_s > h100.hbm_bytes_per_s
    # the run preallocates a share of each GPU (--config.gpu_memory_fraction): programs get no more
    usable = h200.preallocated(0.9)
    assert usable.hbm_bytes == int(0.9 * h200.hbm_bytes) and "gpu_memory_fraction" in usable.source


def test_the_target_config_describes_the_chip_of_the_table():
    """The compiler's target config and the chip table (verdict, roofline) hold the same GPU."""
    for name, gpu in gpu_targets.GPUS.items():
        text, chip = gpu_targets.target_config(gpu), compile_for.CHIPS[name]
        assert f"device_memory_size: {chip.hbm_bytes}\n" in text
        assert f"memory_bandwidth: {int(chip.hbm_bytes_per_s)}\n" in text
        assert "core_count: 132\n" in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
        assert text.count("{") == text.count("}")


@pytest.mark.parametrize("name", ["h200:16", "h200:0", "h200:x", "h100"])
def test_a_gpu_count_outside_one_node_is_a_clear_error(name):
    with pytest.raises(ValueError, match=rf"--compile_for={name}: give the GPUs of one node, 1 to 8"):
        compile_for.topology_devices(name)


def test_an_unknown_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no chip table for 'a100'; known: \['h100', 'h200', 'v4'"):
        compile_for.chip_of("a100:8")


@pytest.mark.skipif(CUDA_PLUGIN, reason="the CUDA plugin is installed here: CI's venv checks its absence")
def test_without_the_cuda_plugin_one_line_names_the_extra():
    with pytest.raises(ValueError) as e:
        compile_for.topology_devices("h200:8")
    assert str(e.value).startswith("--compile_for=h200:8 needs XLA's CUDA compiler: pip install -e '.[compile-gpu]'")
    assert "\n" not in str(e.value)


@needs_cuda
def test_two_nodes_put_the_data_axis_across_nodes():
    """Two nodes of eight H200s: device ids run node by node, so a data axis of 2 is the two
    nodes and fsdp stays within each (NVLink)."""
    from emor3_jax.core import sharding

    devices = compile_for.topology_devices("h200:8", slices=2)
    assert len(devices) == 16 and {d.platform for d in devices} == {"gpu"}
    mesh = sharding.make_mesh([("data", 2), ("fsdp", -1), ("tensor", 1)], devices)
    node = np.vectorize(lambda d: d.process_index)(mesh.devices)
    assert (node == np.array([0, 1])[:, None, None]).all()


@pytest.mark.slow
@needs_cuda
def test_the_small_tiny_step_compiles_for_eight_h200s(tmp_path):
    from test_compile_for import EXPECTED, small_tiny

    c = small_tiny(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = compile_for.main(c, "h200:8")
    text = out.getvalue()
    with open(compile_for.output_path(c, "h200:8", 1)) as f:
        got = json.load(f)
    assert status == 0 and got["fits"] is True and text.rstrip().splitlines()[-1].startswith("fits: yes")
    assert got["devices"] == 8 and got["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert got["chip"]["hbm_bytes"] == int(0.9 * compile_for.CHIPS["h200"].hbm_bytes)
    assert set(EXPECTED) <= {p["name"] for p in got["programs"]}
    for p in got["programs"]:
        assert "error" not in p, p
        assert p["peak_bytes_per_chip"] >= p["argument_bytes"] + p["temp_bytes"] > 0
        # no cost analysis from the CUDA compiler: flops from the lowered program, bytes at least
        # the arguments read and outputs written
        assert p["bytes_accessed"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"]
        assert p["roofline_s"] >= p["bytes_accessed"] / got["chip"]["hbm_bytes_per_s"]
    assert all(p["flops"] > 0 for p in got["programs"] if p["name"] in ("gradient", "logprobs", "rollout_prefill"))
    assert any("no cost analysis from the compiled programs" in n for n in got["notes"])
    # fsdp over eight GPUs: the gradient comes back in the params' sharding, not whole per GPU
    params = got["resident_bytes_per_chip"]["params"]
    assert params * 6 < got["params_bytes"] and got["resident_bytes_per_chip"]["gradients"] == params
    grad = next(p for p in got["programs"] if p["name"] == "gradient")
    assert params <= grad["output_bytes"] < 1.25 * params
    assert got["step_roofline_s"] > got["rollout_roofline_s"] > 0
    assert "PROJECTED" in text and "per chip 126 GiB HBM, 989 TFLOP/s bf16, 4800 GB/s (nvidia.com" in text
