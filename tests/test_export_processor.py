"""An export of a tiny run carries the image processor the run used: transformers rebuilds it
from preprocessor_config.json and it cuts an image into the same patches as our pipeline."""

import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs.qwen_vl import get_config
from emor3_jax import config_lib
from emor3_jax.core import sharding
from emor3_jax.core.checkpoint import Checkpointer
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.data.tokenizers import build_test_tokenizer, special_token_ids
from emor3_jax.export import export
from emor3_jax.models.qwen25_vl.model import architecture, create_model

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 2, 56 * 84  # not the defaults: the file must carry the run's


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mesh1):
    """A tiny run's workdir with one saved step (random weights), exported."""
    workdir = tmp_path_factory.mktemp("run")
    c = get_config("tiny")
    c.workdir = str(workdir)
    c.data.min_pixels, c.data.max_pixels = MIN_PIXELS, MAX_PIXELS
    tok = build_test_tokenizer(str(workdir / "tokenizer"))
    cfg = config_lib.model_config(c, len(tok), special_token_ids(tok))
    _, params = nnx.split(create_model(cfg, mesh1, sharding.DEFAULT_RULES, seed=0))
    ck = Checkpointer(str(workdir / "ckpt"), keep=1, async_save=False)
    ck.save(1, {"params": params}, {"model": architecture(cfg), "config": c.to_json()})
    ck.close()
    return export(str(workdir), str(tmp_path_factory.mktemp("hf")))


def test_preprocessor_config_carries_the_runs_pixels_and_patches(exported):
    with open(os.path.join(exported, "preprocessor_config.json")) as f:
        cfg = json.load(f)
    assert cfg["size"] == {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    assert (cfg["patch_size"], cfg["merge_size"], cfg["temporal_patch_size"]) == (14, 2, 2)
    assert cfg["image_processor_type"] == "Qwen2VLImageProcessor"


def test_transformers_image_processor_from_the_export_matches_the_pipeline(exported):
    from transformers import AutoImageProcessor

    hf = AutoImageProcessor.from_pretrained(exported)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8))
    out = hf(images=[image], return_tensors="np")
    ours, grid = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(image)
    np.testing.assert_array_equal(np.asarray(out["image_grid_thw"]).reshape(3), grid)
    np.testing.assert_allclose(np.asarray(out["pixel_values"]), ours, rtol=0, atol=1e-6)
    # 70x100 fits 56x56 under max_pixels = 56*84; the tiny default (56*56) would give 28x56 = [1, 2, 4].
    assert grid.tolist() == [1, 4, 4]


def test_the_exports_tokenizer_and_image_processor_agree_with_its_model(exported):
    """What AutoProcessor reads from the export, less the video processor: transformers builds
    that with torchvision, which has no CPU wheel for the test extra's torch pin (the 0.28.0
    wheel fails to load its ops against torch 2.13.0+cpu), and AutoProcessor then fails. The
    tokenizer and image processor load from the export, and the tokenizer's vision tokens are
    the ids the exported model config expects."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoConfig.from_pretrained(exported)
    assert AutoImageProcessor.from_pretrained(exported).size == {
        "shortest_edge": MIN_PIXELS,
        "longest_edge": MAX_PIXELS,
    }
    ids = special_token_ids(tok)
    for token, field in (("<|image_pad|>", "image_token_id"), ("<|video_pad|>", "video_token_id")):
        assert tok.convert_tokens_to_ids(token) == ids[token] == getattr(model, field), token
    assert tok.convert_tokens_to_ids("<|vision_start|>") == model.vision_start_token_id
