"""Tests for emor3_jax.data.processing: the image processor against transformers' PIL one."""

import io

import numpy as np
import PIL.Image
import pytest
from official_images import CHECKPOINT_PIXELS, OFFICIAL_PIXELS, official_first_stage, official_processor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from emor3_jax.data.processing import ImageProcessor, largest_image_tokens

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64


def _image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode == "P":  # a palette image: 256 random colours
        image = PIL.Image.fromarray(pixels.squeeze(-1), "P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return image
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


# ---------------------------------------------------------------------------
# The official two-stage resize: EasyR1's process_image, then the checkpoint's processor
# (tests/official_images.py transcribes it).

OFFICIAL, CHECKPOINT = OFFICIAL_PIXELS, CHECKPOINT_PIXELS


@pytest.fixture(scope="module")
def two_stage():
    return ImageProcessor(
        min_pixels=OFFICIAL[0], max_pixels=OFFICIAL[1], resize="two_stage", checkpoint_pixels=CHECKPOINT
    )


@pytest.mark.parametrize(
    "width, height, mode",
    [
        # under 512^2 pixels: scaled up first
        (500, 375, "RGB"),
        (10, 10, "RGB"),  # one stage refuses it (under 28x28); the official run scales it up
        (28, 28, "RGB"),
        (100, 130, "L"),
        (333, 777, "RGB"),
        (511, 512, "RGB"),
        (640, 400, "P"),  # palette: PIL's default filter is nearest
        (200, 1500, "RGBA"),  # alpha dropped by convert("RGB"), not put on white
        (30, 3000, "RGB"),
        (3000, 30, "RGB"),
        (4000, 60, "RGB"),
        (60, 4000, "L"),
        # inside [512^2, 2048^2]: the checkpoint's processor alone
        (512, 512, "RGB"),
        (1024, 768, "RGB"),
        (1920, 1080, "RGB"),
        (2000, 2000, "RGB"),
        (7000, 150, "RGB"),
        # over 2048^2: scaled down first
        (2049, 2048, "RGB"),
        (3000, 2000, "RGBA"),
        (4000, 3000, "RGB"),
        (20000, 300, "RGB"),
        (301, 15000, "P"),
    ],
)
def test_two_stage_matches_the_official_first_stage_then_transformers(two_stage, width, height, mode):
    image = _image(width, height, mode, seed=width + height)
    pixel_values, grid_thw = two_stage(image)
    ref = official_processor()(images=[official_first_stage(image)], return_tensors=None)
    ref_grid = np.asarray(ref["image_grid_thw"])[0]
    np.testing.assert_array_equal(grid_thw, ref_grid)
    np.testing.assert_array_equal(pixel_values, np.asarray(ref["pixel_values"], np.float32))
    assert two_stage.image_tokens(width, height) == np.prod(ref_grid) // 4  # from the size alone


def test_two_stage_vision_tokens_by_hand(two_stage):
    """500 x 375 (187,500 pixels): first x sqrt(262144 / 187500) = 1.1824 -> int -> 591 x 443,
    then each side to the nearest multiple of 28: 588 x 448 = 21 x 16 merged patches = 336
    tokens. One stage scales 375 x 500 up with ceil instead: 616 x 448 = 22 x 16 = 352."""
    _, grid = two_stage(_image(500, 375))
    assert grid.tolist() == [1, 32, 42] and two_stage.image_tokens(500, 375) == 336
    one = ImageProcessor(min_pixels=OFFICIAL[0], max_pixels=OFFICIAL[1])
    assert one(_image(500, 375))[1].tolist() == [1, 32, 44] and one.image_tokens(500, 375) == 352
    # At data.min_pixels (the drop filter's "would it fit smaller"): 1000 x 1000 -> 512 x 512 -> 504 x 504.
    assert two_stage.image_tokens(1000, 1000, OFFICIAL[0]) == 18 * 18


def test_two_stage_extreme_aspect_ratio_raises(two_stage):
    # 5880 x 28 is scaled up to 7419 x 35 (ratio 212 > 200), which smart_resize refuses.
    with pytest.raises(ValueError, match=r"row 9: image 7419x35: absolute aspect ratio"):
        two_stage(_image(28 * 210, 28), source="row 9")
    with pytest.raises(ValueError, match="aspect ratio"):
        two_stage.image_tokens(28 * 210, 28)


def test_largest_two_stage_image_passes_max_pixels():
    """154 x 27235 pixels (4,194,190 <= 2048^2) rounds to 168 x 27244: 6 x 973 = 5838 tokens,
    past the 5349 a one-stage 2048^2 image can take."""
    bounds = (OFFICIAL, CHECKPOINT)
    assert largest_image_tokens("two_stage", *bounds) == 5838
    two = ImageProcessor(
        min_pixels=OFFICIAL[0], max_pixels=OFFICIAL[1], resize="two_stage", checkpoint_pixels=CHECKPOINT
    )
    assert two.image_tokens(27235, 154) == 5838
    assert largest_image_tokens("one_stage", OFFICIAL, OFFICIAL) == 5349


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resize="twice"), "resize must be one of"),
        (dict(resize="two_stage"), r"two_stage needs checkpoint_pixels = \(min, max\).*got \(\)"),
        (dict(resize="two_stage", checkpoint_pixels=(4000, 3000)), r"got \(4000, 3000\)"),
    ],
)
def test_bad_two_stage_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **kwargs)
