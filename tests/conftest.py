"""Test session setup: 8 fake CPU devices (set before jax is imported anywhere), offline HF,
and the shared tiny transformers model."""

import atexit
import os
import shutil
import tempfile

# LLVM at -O0 for the CPU programs: the tests' programs are tiny and compiled once or twice
# each, so compiling is most of their time; -O0 cuts it by about a third (one GRPO update test:
# 14.9 s -> 9.7 s of XLA compilation, 19.2 s -> 14.1 s in all), and the programs compute the
# same math (CPU fast-math stays off).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The end-to-end tests start `python -m emor3_jax.train` a few dozen times with the same tiny
# programs: one persistent compilation cache for the session and its subprocesses compiles
# each program once (about half of such a run's time on 2 cores). pytest-xdist's workers
# inherit the controller's environment, so they find the variable set and share its folder;
# only the process that made the folder removes it. Two processes writing one entry at once
# are harmless: JAX reads a half-written entry as a miss (a warning) and compiles it again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="emor3-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity is checked in fp32: keep XLA's CPU matmuls at full precision.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def hf_tiny():
    """A tiny random transformers Qwen2.5-VL (eager attention, fp32)."""
    from qwen_fixtures import hf_model

    return hf_model(seed=0)


@pytest.fixture(scope="session")
def hf_tiny_dir(hf_tiny, tmp_path_factory):
    """`hf_tiny` saved with save_pretrained (hub key layout)."""
    path = tmp_path_factory.mktemp("hf_tiny")
    hf_tiny.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def mesh1():
    from emor3_jax.core import sharding

    return sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:1])


@pytest.fixture(scope="session")
def ours_fp32(hf_tiny_dir, mesh1):
    """`hf_tiny` loaded into our model on one device, fp32 compute."""
    from emor3_jax.core import sharding
    from emor3_jax.models.qwen25_vl.convert import load_hf

    return load_hf(
        hf_tiny_dir, mesh1, sharding.DEFAULT_RULES, param_dtype="float32", compute_dtype="float32", attention_impl="xla"
    )
