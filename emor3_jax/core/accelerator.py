"""Process-wide accelerator settings, made once at start-up before a JAX backend starts: the
persistent compilation cache and the share of each GPU's memory XLA preallocates.

An environment variable the operator (or the test suite, tests/conftest.py) set wins over the
config field; `setup` returns one line saying which value is in force and why.
"""

from __future__ import annotations

import os

import jax

from emor3_jax.core import paths

CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
GPU_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# A program whose compile took under a second is not worth an entry: reading one back from
# gs:// takes about as long. The 3b/7b programs take minutes and are all kept.
MIN_COMPILE_SECS = 1.0


def use_compile_cache(directory: str, min_compile_secs: float = MIN_COMPILE_SECS) -> None:
    """Compiled programs are written to and read from `directory` (local or gs://), so a run
    restarted after a preemption loads its programs instead of compiling them again."""
    jax.config.update("jax_compilation_cache_dir", paths.absolute(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    # -1: no minimum size; jax's default (0) lets it pick one per filesystem.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def set_gpu_memory_fraction(fraction: float) -> None:
    """XLA's GPU client preallocates `fraction` of each GPU's memory when it starts (jax's own
    default is 0.75); read once, so it must be set before the first device is touched."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--config.gpu_memory_fraction={fraction} must be in (0, 1]")
    os.environ[GPU_FRACTION_ENV] = str(fraction)


def setup(cache_dir: str | None, gpu_fraction: float) -> str:
    """Both settings from the config's values (cache_dir None: no cache); the environment's
    when set. Returns what is in force, one line to print."""
    if os.environ.get(CACHE_ENV):
        cache = f"{os.environ[CACHE_ENV]} (from {CACHE_ENV})"
    elif cache_dir:
        use_compile_cache(cache_dir)
        cache = paths.absolute(cache_dir)
    else:
        cache = "off"
    if os.environ.get(GPU_FRACTION_ENV):
        fraction = f"{os.environ[GPU_FRACTION_ENV]} (from {GPU_FRACTION_ENV})"
    else:
        set_gpu_memory_fraction(gpu_fraction)
        fraction = str(gpu_fraction)
    return f"compilation cache: {cache}; GPU memory preallocated: {fraction}"
