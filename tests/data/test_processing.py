"""Tests for emor3_jax.data.processing: the image processor against transformers' PIL one."""

import io

import numpy as np
import PIL.Image
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from emor3_jax.data.processing import ImageProcessor

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64


def _image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


@pytest.fixture(scope="module")
def proc():
    return ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    "width, height, mode",
    [(56, 56, "RGB"), (100, 70, "RGB"), (30, 29, "RGB"), (400, 300, "RGB"), (90, 60, "RGBA"), (64, 48, "L")],
)
def test_matches_transformers(proc, width, height, mode):
    image = _image(width, height, mode)
    pixel_values, grid_thw = proc(image)
    ref = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(images=[image], return_tensors=None)
    assert pixel_values.dtype == np.float32 and grid_thw.shape == (3,)
    np.testing.assert_array_equal(pixel_values, np.asarray(ref["pixel_values"], np.float32))
    np.testing.assert_array_equal(grid_thw, np.asarray(ref["image_grid_thw"])[0])
    t, h, w = grid_thw
    assert pixel_values.shape == (t * h * w, 3 * 2 * 14 * 14)
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    assert MIN_PIXELS <= h * w * 14 * 14 <= MAX_PIXELS


def test_alpha_on_white(proc):
    transparent = PIL.Image.new("RGBA", (56, 56), (10, 200, 30, 0))
    white = PIL.Image.new("RGB", (56, 56), (255, 255, 255))
    np.testing.assert_array_equal(proc(transparent)[0], proc(white)[0])


def test_min_max_pixels_from_arguments():
    image = _image(400, 300)
    _, small_grid = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=28 * 28 * 4)(image)
    _, large_grid = ImageProcessor(min_pixels=28 * 28 * 100, max_pixels=28 * 28 * 400)(image)
    assert small_grid[1] * small_grid[2] <= 16 and large_grid[1] * large_grid[2] >= 400


@pytest.mark.parametrize("size", [(27, 100), (100, 20), (1, 1)])
def test_too_small_raises(proc, size):
    with pytest.raises(ValueError, match=r"img/7\.png.*smaller than the 28x28 minimum"):
        proc(_image(*size), source="img/7.png")


def test_extreme_aspect_ratio_raises(proc):
    with pytest.raises(ValueError, match="row 3"):
        proc(_image(28 * 210, 28), source="row 3")


def test_corrupt_raises(proc):
    buf = io.BytesIO()
    _image(64, 64).save(buf, format="PNG")
    truncated = PIL.Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))
    with pytest.raises(ValueError, match="broken.png: corrupt"):
        proc(truncated, source="broken.png")


@pytest.mark.parametrize("min_pixels, max_pixels", [(100, 10_000), (5000, 4000)])
def test_bad_limits_raise(min_pixels, max_pixels):
    with pytest.raises(ValueError, match=str(min_pixels)):
        ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
