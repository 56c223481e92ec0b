"""The decoder layers and vision blocks run as scans: the lowered program holds one layer body
each, so its size does not grow with the depth (the 3B/7B compiles stay minutes)."""

import dataclasses

import jax
import numpy as np
from flax import nnx
from qwen_fixtures import CASES, make_batch

from emor3_jax.models.qwen25_vl.model import abstract_model, prepare_inputs


def _ops(cfg, grad: bool) -> tuple[int, int]:
    """(operations, while loops) in the StableHLO of the model's forward (or its gradient) on
    one image and text, lowered from the abstract model (nothing is compiled or allocated)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    inputs = prepare_inputs(cfg, **make_batch(*CASES["one_image"][:1], np.random.default_rng(0)))
    inputs.pop("rope_deltas")
    loss = lambda s: nnx.merge(graphdef, s)(**inputs).sum()
    text = jax.jit(jax.grad(loss) if grad else loss).lower(state).as_text()
    lines = [line for line in text.splitlines() if " = " in line]
    return len(lines), text.count("stablehlo.while")


def test_the_program_has_one_body_per_stack_whatever_the_depth(ours_fp32):
    cfg = ours_fp32.cfg
    deep = cfg.replace(
        text=dataclasses.replace(cfg.text, num_layers=2 * cfg.text.num_layers),
        vision=dataclasses.replace(cfg.vision, depth=2 * cfg.vision.depth),
    )
    ops, loops = _ops(cfg, grad=False)
    assert loops == 2  # the decoder's scan and the tower's
    assert _ops(deep, grad=False) == (ops, loops)  # twice the layers, the same program
    grad_ops, grad_loops = _ops(cfg, grad=True)
    assert grad_loops == 4  # each scan and its transpose
    assert _ops(deep, grad=True) == (grad_ops, grad_loops)
