"""core/profile.py: compiles counted from JAX's monitoring events, attributed to the phase
and step they happen in; the table shows them."""

import time

import jax
import numpy as np

from emor3_jax.core import profile


def test_counts_each_new_program_in_its_phase_and_step():
    f = jax.jit(lambda x: x * 2 + 1)
    p = profile.Profile()
    try:
        t0 = time.perf_counter()
        with p.phase("first"):
            f(np.ones(3, np.float32)).block_until_ready()  # a new program
            f(np.ones(3, np.float32)).block_until_ready()  # cached: none
        p.step("step 1", t0)
        t0 = time.perf_counter()
        with p.phase("second"):
            f(np.ones(5, np.float32)).block_until_ready()  # a new shape: one more
        start = time.perf_counter()
        f(np.ones(7, np.float32)).block_until_ready()
        p.windows(start, {"timed_s": time.perf_counter() - start})
        p.step("step 2", t0)
        t0 = time.perf_counter()
        f(np.ones(3, np.float32)).block_until_ready()
        p.step("step 3", t0)
        s = p.summary({"train": 2})
    finally:
        p.close()
    assert s["phases"]["first"]["programs"] == 1 and s["phases"]["second"]["programs"] == 1
    assert s["phases"]["timed"]["programs"] == 1 and s["phases"]["first"]["compile_s"] > 0
    assert [st["programs"] for st in s["steps"]] == [1, 2, 0]
    assert s["steps"][1]["by_phase"] == {"second": 1, "timed": 1}
    assert s["programs"] == 3 and s["peak_host_memory_gb"] > 0 and s["prompts_dropped"] == {"train": 2}
    text = profile.table(s)
    assert "3 programs compiled" in text and "prompts dropped (over rl.max_prompt_len): train 2" in text
    assert "  step 2             2  (second 1, timed 1)" in text


def test_a_closed_profile_counts_nothing_more():
    p = profile.Profile()
    p.close()
    jax.jit(lambda x: x - 3)(np.ones(2, np.float32)).block_until_ready()
    assert p.compiles == []
