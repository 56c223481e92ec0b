"""Config reading (flat hub form and nested v5 form), presets vs the hub configs, validation."""

import json
import os

import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from emor3_jax.models.qwen25_vl.config import ModelConfig, preset
from emor3_jax.models.qwen25_vl.convert import hf_shape, weight_table
from emor3_jax.models.qwen25_vl.model import abstract_model

ASSETS = os.path.join(os.path.dirname(__file__), "..", "assets", "hf_configs")
HUB = {"3b": "qwen2_5_vl_3b_instruct.json", "7b": "qwen2_5_vl_7b_instruct.json"}


def _hub(name):
    with open(os.path.join(ASSETS, HUB[name])) as f:
        return json.load(f)


@pytest.mark.parametrize("name", list(HUB))
def test_hub_flat_config_reads_to_the_preset(name):
    assert ModelConfig.from_hf_dict(_hub(name)) == preset(name)


@pytest.mark.parametrize("name", list(HUB))
def test_nested_v5_form_reads_the_same(name, tmp_path):
    """transformers v5 rewrites the hub config nested; both forms give one ModelConfig."""
    Qwen2_5_VLConfig.from_dict(_hub(name)).save_pretrained(tmp_path)
    nested = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in nested and "hidden_size" not in nested
    assert ModelConfig.from_hf_dict(nested) == preset(name)


@pytest.mark.parametrize("name", list(HUB))
def test_to_hf_dict_round_trips_through_transformers(name, tmp_path):
    cfg = preset(name)
    hf = Qwen2_5_VLConfig.from_dict(cfg.to_hf_dict())
    hf.save_pretrained(tmp_path)
    assert ModelConfig.from_hf_dir(str(tmp_path)) == cfg


@pytest.mark.parametrize("name", list(HUB))
def test_preset_parameter_shapes_equal_transformers(name):
    """eval_shape of ours vs transformers built on the meta device: no memory either side."""
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(_hub(name)))
    hub_names = {}
    for key, p in hf.state_dict().items():  # in-memory names -> hub names
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        hub_names[key] = tuple(p.shape)
    cfg = preset(name)
    if cfg.tie_word_embeddings:
        assert hub_names.pop("lm_head.weight") == hub_names["model.embed_tokens.weight"]
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
    table = weight_table(cfg)
    assert {e.hf_key for e in table} == set(hub_names)
    for e in table:
        assert hf_shape(e.layout, e.shape(flat[e.path]), cfg) == hub_names[e.hf_key], e.hf_key  # a layer's slice


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("compute_dtype", "float64", "param_dtype/compute_dtype must be in"),
        ("attention_impl", "flashy", r"attention_impl must be one of .*'splash', 'flash'"),
    ],
)
def test_bad_runtime_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        preset("3b", **{field: value})


def test_bad_architecture_values_are_refused():
    d = _hub("3b")
    d["rope_scaling"]["mrope_section"] = [16, 24, 16]
    with pytest.raises(ValueError, match=r"2 \* sum\(mrope_section=\[16, 24, 16\]\) must equal head_dim 128"):
        ModelConfig.from_hf_dict(d)
    d = _hub("3b")
    d["use_sliding_window"] = True
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("buckets", [(30,), (64, 32), (0, 64), (64, 64)])
def test_bad_vision_buckets_are_refused(buckets):
    with pytest.raises(
        ValueError, match=r"vision_buckets .* must be increasing positive multiples of the merge unit 4"
    ):
        preset("3b", vision_buckets=buckets)


@pytest.mark.parametrize("variant", ["tiny", "3b"])
def test_run_config_buckets_reach_the_model_and_hold_one_max_pixels_image(variant):
    from configs.qwen_vl import get_config
    from emor3_jax import config_lib

    c = get_config(variant)
    buckets = config_lib.runtime_fields(c)["vision_buckets"]
    assert buckets == tuple(c.model.vision_buckets) and buckets
    assert preset("3b", vision_buckets=buckets).vision_buckets == buckets  # valid for the model
    assert max(buckets) >= c.data.max_pixels // (14 * 14)
    c.model.vision_buckets = (8,)
    c.hf_path, c.data.source = "", "synthetic"  # leave only the bucket problem (and variant paths) to report
    with pytest.raises(
        ValueError, match=r"--config.model.vision_buckets=\(8,\) must reach one image at data.max_pixels"
    ):
        config_lib.validate(c)
