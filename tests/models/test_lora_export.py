"""A LoRA model out to Hugging Face (models/qwen25_vl/lora_export.py), checked with transformers
and peft themselves: the merged checkpoint loads in transformers with our adapted model's logits,
and the PEFT folder loads with `PeftModel.from_pretrained` onto the transformers base with the
same logits; adapters on every target group (language model, vision tower, merger)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen_fixtures import CASES, hf_forward, make_batch
from safetensors.numpy import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from emor3_jax.core import sharding
from emor3_jax.models import lora
from emor3_jax.models.api import prepare_inputs
from emor3_jax.models.qwen25_vl.convert import load_hf, save_hf
from emor3_jax.models.qwen25_vl.lora_export import save_merged, save_peft

RULES = sharding.DEFAULT_RULES
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def adapted(hf_tiny_dir, mesh1):
    """hf_tiny with rank-4 adapters on every target group, each lora_b drawn N(0, 0.05) so the
    adapted model differs from its base."""
    model = load_hf(
        hf_tiny_dir,
        mesh1,
        RULES,
        param_dtype="float32",
        compute_dtype="float32",
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_targets=tuple(lora.TARGETS),
    )
    keys = iter(jax.random.split(jax.random.key(7), 1000))
    state = nnx.state(model)

    def draw(path, v):
        return v.replace(0.05 * jax.random.normal(next(keys), v.shape, v.dtype)) if path[-1] == "lora_b" else v

    nnx.update(model, nnx.from_flat_state([(p, draw(p, v)) for p, v in nnx.to_flat_state(state)]))
    return model


def _batch():
    rows, pad = CASES["mixed_batch"]
    return make_batch(rows, np.random.default_rng(3), pad)


def _ours(model, batch):
    inputs = prepare_inputs(model.cfg, **batch)
    inputs.pop("rope_deltas")
    return np.asarray(nnx.jit(lambda m, x: m(**x))(model, inputs))


def _close(ours, theirs, batch):
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-5, rtol=1e-5)


def test_the_adapters_change_the_logits(adapted, hf_tiny):
    """Else the two checks below would pass with adapters dropped."""
    batch = _batch()
    real = batch["attention_mask"].astype(bool)
    assert np.abs(_ours(adapted, batch)[real] - hf_forward(hf_tiny, batch)[0][real]).max() > 1e-2


def test_merged_export_loads_in_transformers_with_our_logits(adapted, hf_tiny_dir, tmp_path):
    out = str(tmp_path / "merged")
    save_merged(adapted, out, like=hf_tiny_dir)
    assert not any("lora" in k for k in load_file(os.path.join(out, "model.safetensors")))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    batch = _batch()
    _close(_ours(adapted, batch), hf_forward(reloaded, batch)[0], batch)


def test_a_bf16_base_merged_into_fp32_keeps_the_adapted_logits(adapted, hf_tiny_dir, tmp_path):
    """The merge is rounded once, to the export's dtype: a bf16 base exported in fp32 gives our
    adapted model's logits (which add the fp32 adapters to the bf16 kernels); merged in bf16 it
    would not (the check can fail)."""
    state = nnx.state(adapted)
    bf16 = lambda v: v if isinstance(v, lora.LoRAParam) else v.replace(v.get_value().astype(jnp.bfloat16))
    low = nnx.merge(nnx.graphdef(adapted), jax.tree.map(bf16, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    batch = _batch()
    want = _ours(low, batch)
    for dtype, close in (("float32", True), ("bfloat16", False)):
        out = str(tmp_path / dtype)
        save_merged(low, out, like=hf_tiny_dir, dtype=dtype)
        kw = dict(attn_implementation="eager", dtype=torch.float32)
        reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, **kw).eval()
        got = hf_forward(reloaded, batch)[0]
        if close:
            _close(want, got, batch)
        else:
            assert np.abs(got - want)[batch["attention_mask"].astype(bool)].max() > 1e-3


def test_peft_folder_loads_onto_the_transformers_base_with_our_logits(adapted, hf_tiny_dir, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is in the test extra (pip install -e '.[test]')")
    out = str(tmp_path / "adapter")
    save_peft(adapted, out, base=hf_tiny_dir, dropout=0.05)  # a training setting: eval() logits are the same
    config = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (RANK, ALPHA, hf_tiny_dir)
    assert config["lora_dropout"] == 0.05
    assert "model.visual.merger.mlp.0" in config["target_modules"]
    assert "model.language_model.layers.1.mlp.down_proj" in config["target_modules"]
    assert "lm_head" in config["target_modules"]
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_tiny_dir, attn_implementation="eager").eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    # Every adapter we wrote became one of PEFT's modules, and every PEFT module got our weights.
    written = set(load_file(os.path.join(out, "adapter_model.safetensors")))
    loaded = {k.replace(".default", "") for k in model.state_dict() if ".lora_" in k}
    assert written == loaded
    batch = _batch()
    _close(_ours(adapted, batch), hf_forward(model.get_base_model(), batch)[0], batch)  # lora layers injected in it


def test_a_model_without_adapters_is_refused_by_save_peft_and_adapters_by_save_hf(adapted, ours_fp32, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft(ours_fp32, str(tmp_path / "a"), base="x")
    with pytest.raises(ValueError, match="merge them first"):
        save_hf(adapted, str(tmp_path / "b"))
