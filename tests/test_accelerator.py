"""Start-up settings of the accelerator runtime (core/accelerator.py), each in a fresh process:
they take effect only before a JAX backend starts, and this suite's own process already has
one (with the suite-wide compilation cache conftest.py set)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVS = ("JAX_COMPILATION_CACHE_DIR", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def _python(code: str, **env) -> str:
    """Runs `code` in a fresh interpreter without the suite's cache and fraction variables
    (plus `env`); its stdout."""
    clean = {k: v for k, v in os.environ.items() if k not in ENVS}
    clean.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env)
    cmd = [sys.executable, "-c", code]
    done = subprocess.run(cmd, env=clean, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


COMPILE = """
import jax, jax.numpy as jnp
from emor3_jax.core import accelerator
accelerator.use_compile_cache({cache!r}, min_compile_secs=0.0)
print(float(jax.jit(lambda x: jnp.sin(x) * 3.0 + x)(jnp.ones(7)).sum()))
"""


def test_a_compiled_program_is_written_to_the_cache_and_read_back(tmp_path):
    cache = tmp_path / "cache"
    first = _python(COMPILE.format(cache=str(cache)))
    entries = sorted(os.listdir(cache))
    assert entries, "no cache entry written"
    # A second process (a restarted run) gets the same result and adds no entry for the program.
    assert _python(COMPILE.format(cache=str(cache))) == first
    assert sorted(os.listdir(cache)) == entries


SETUP = """
import os
from configs.qwen_vl import get_config
from emor3_jax import config_lib
from emor3_jax.core import accelerator
c = get_config("tiny")
c.workdir, c.gpu_memory_fraction = {workdir!r}, 0.85
print(accelerator.setup(config_lib.compile_cache_dir(c), c.gpu_memory_fraction))
import jax
print(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), jax.config.jax_compilation_cache_dir)
"""


def test_setup_applies_the_config_unless_the_environment_says_otherwise(tmp_path):
    out = _python(SETUP.format(workdir=str(tmp_path))).splitlines()
    cache = str(tmp_path / "compile_cache")
    assert out == [f"compilation cache: {cache}; GPU memory preallocated: 0.85", f"0.85 {cache}"]
    out = _python(SETUP.format(workdir=str(tmp_path)), XLA_PYTHON_CLIENT_MEM_FRACTION="0.5").splitlines()
    assert out[0].endswith("GPU memory preallocated: 0.5 (from XLA_PYTHON_CLIENT_MEM_FRACTION)")
    assert out[1] == f"0.5 {cache}"
