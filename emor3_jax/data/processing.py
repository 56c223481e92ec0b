"""Images -> Qwen2.5-VL patch rows, with transformers' PIL image processor (no torchvision).

Two ways to size an image (data.resize):
  one_stage  Qwen's smart_resize straight into [data.min_pixels, data.max_pixels] (ours).
  two_stage  the official run's pipeline: EasyR1's `process_image` first resizes with PIL into
             [data.min_pixels, data.max_pixels] (/work/ref/emo-r3 verl/utils/dataset.py:54-78),
             then the checkpoint's own image processor rounds to multiples of 28 within its
             own bounds (data.checkpoint_pixels). A 500 x 375 image: 336 vision tokens this
             way (591 x 443 -> 588 x 448), 352 in one stage (616 x 448).

Letters: L patch rows (t * h * w, in merge-block order), C = 3 * 2 * 14 * 14 = 1176 values
per row (channel, time, patch row, patch column).
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

MIN_SIDE = 28  # patch_size * merge_size: the smallest image side the processor accepts
RESIZES = ("one_stage", "two_stage")


def _hf():
    """transformers' Qwen2-VL PIL image processor module, imported on first use: it imports torch
    (~4 s), which config validation and the workdir lock at start-up must not wait for."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl

    return image_processing_pil_qwen2_vl


def first_stage_sizes(width: int, height: int, min_pixels: int, max_pixels: int) -> list[tuple[int, int]]:
    """The (width, height) of each PIL resize EasyR1's process_image makes (0, 1 or 2 of them):
    above max_pixels it scales by sqrt(max_pixels / pixels), then below min_pixels by
    sqrt(min_pixels / pixels), each side truncated with int() (verl/utils/dataset.py:65-73)."""
    sizes = []
    for bound, applies in ((max_pixels, lambda p: p > max_pixels), (min_pixels, lambda p: p < min_pixels)):
        if applies(width * height):
            factor = math.sqrt(bound / (width * height))
            width, height = int(width * factor), int(height * factor)
            sizes.append((width, height))
    return sizes


def first_stage(image: PIL.Image.Image, min_pixels: int, max_pixels: int, source: str = "<image>") -> PIL.Image.Image:
    """EasyR1's process_image on a decoded image: the resizes of `first_stage_sizes` with PIL's
    default filter for the image's own mode (bicubic; nearest for modes 1 and P), then a plain
    convert("RGB") (transparency dropped, not composited). A corrupt image raises ValueError."""
    try:
        image.load()
        for size in first_stage_sizes(image.width, image.height, min_pixels, max_pixels):
            image = image.resize(size)
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for corrupt data or a 0-pixel side
        raise ValueError(f"{source}: corrupt or unreadable image, or one it cannot resize: {e}") from e


class ImageProcessor:
    """Sizes an image (one_stage or two_stage, above), normalises it with the CLIP mean/std and
    cuts it into patches. The spec's training setting is min_pixels = 512 * 512, max_pixels =
    2048 * 2048; `checkpoint_pixels` = (min, max) pixels of the checkpoint's own processor
    (two_stage only; Qwen2.5-VL-3B/7B-Instruct's preprocessor_config.json: 3136, 12845056).
    """

    def __init__(
        self,
        *,
        min_pixels: int,
        max_pixels: int,
        resize: str = "one_stage",
        checkpoint_pixels: tuple[int, int] = (),
    ):
        if not MIN_SIDE * MIN_SIDE <= min_pixels <= max_pixels:
            raise ValueError(
                f"ImageProcessor: need {MIN_SIDE * MIN_SIDE} <= min_pixels <= max_pixels, "
                f"got min_pixels={min_pixels}, max_pixels={max_pixels}"
            )
        if resize not in RESIZES:
            raise ValueError(f"ImageProcessor: resize must be one of {RESIZES}, got {resize!r}")
        two = resize == "two_stage"
        if two and not (len(checkpoint_pixels) == 2 and MIN_SIDE**2 <= checkpoint_pixels[0] <= checkpoint_pixels[1]):
            raise ValueError(
                f"ImageProcessor: two_stage needs checkpoint_pixels = (min, max) with {MIN_SIDE**2} <= min <= max, "
                f"got {tuple(checkpoint_pixels)}"
            )
        self.min_pixels, self.max_pixels, self.resize = min_pixels, max_pixels, resize
        # The bounds smart_resize applies: the checkpoint processor's after the first stage.
        self.bounds = tuple(checkpoint_pixels) if two else (min_pixels, max_pixels)
        self.hf = _hf().Qwen2VLImageProcessorPil(min_pixels=self.bounds[0], max_pixels=self.bounds[1])
        self.merge_size = self.hf.merge_size
        if self.hf.patch_size * self.merge_size != MIN_SIDE:
            raise AssertionError(f"the processor's patches are not {MIN_SIDE}-pixel merged blocks")

    def __call__(self, image: PIL.Image.Image, source: str = "<image>") -> tuple[np.ndarray, np.ndarray]:
        """Returns (pixel_values [L, 1176] float32, grid_thw [3] int64), L = t * h * w.

        `source` names the image (file, data set row) in errors: a corrupt image, one
        smaller than 28x28 (one_stage) or with an aspect ratio above 200 raises ValueError.
        """
        if self.resize == "two_stage":
            if not isinstance(image, PIL.Image.Image):
                raise ValueError(f"{source}: expected a PIL image, got {type(image).__name__}")
            rgb = first_stage(image, self.min_pixels, self.max_pixels, source)
        else:
            rgb = to_rgb(image, source)
            if min(rgb.size) < MIN_SIDE:
                raise ValueError(f"{source}: image is {rgb.width}x{rgb.height}, smaller than the 28x28 minimum")
        width, height = rgb.size
        try:
            out = self.hf(images=[rgb], return_tensors=None)
        except ValueError as e:  # smart_resize: aspect ratio above 200
            raise ValueError(f"{source}: image {width}x{height}: {e}") from e
        pixel_values = np.asarray(out["pixel_values"], np.float32)
        grid_thw = np.asarray(out["image_grid_thw"], np.int64).reshape(3)
        if pixel_values.shape[0] != np.prod(grid_thw):
            raise AssertionError(f"{source}: {pixel_values.shape[0]} patch rows for grid {grid_thw.tolist()}")
        return pixel_values, grid_thw

    def image_tokens(self, width: int, height: int, max_pixels: int | None = None) -> int:
        """Vision tokens (merged patches) of a `width` x `height` image, from its size alone;
        `max_pixels` replaces data.max_pixels (data.min_pixels: the fewest it could take).
        Raises ValueError where __call__ would on the size (aspect ratio above 200)."""
        pixels = (self.min_pixels, self.max_pixels if max_pixels is None else max_pixels)
        return image_tokens(width, height, self.resize, pixels, self.bounds)


def image_tokens(width: int, height: int, resize: str, pixels: tuple[int, int], bounds: tuple[int, int]) -> int:
    """Vision tokens of a `width` x `height` image sized by `resize` into `pixels` = (data.min_pixels,
    data.max_pixels), smart_resize rounding within `bounds` (two_stage: the checkpoint's pixels;
    one_stage: `pixels`)."""
    if resize == "two_stage":
        width, height = ([(width, height)] + first_stage_sizes(width, height, *pixels))[-1]
        if min(width, height) < 1:  # PIL refuses it too
            raise ValueError(f"the first stage resizes it to {width}x{height} pixels")
    h, w = _hf().smart_resize(height, width, factor=MIN_SIDE, min_pixels=bounds[0], max_pixels=bounds[1])
    return h * w // MIN_SIDE**2


def largest_image_tokens(resize: str, pixels: tuple[int, int], bounds: tuple[int, int]) -> int:
    """The most vision tokens any image takes (`image_tokens`' arguments). one_stage: smart_resize
    stays within max_pixels. two_stage: the first stage leaves any W x H <= max_pixels (the most
    tokens, for each H, at W = max_pixels // H) and the second rounds each side to the nearest
    multiple of 28, up by as much as 14 pixels: at 2048^2, 5838 tokens (154 x 27235 pixels -> 168
    x 27244) where one stage gives at most 5349."""
    if resize == "one_stage":
        return pixels[1] // MIN_SIDE**2
    best = 0
    for h in range(1, math.isqrt(pixels[1]) + 1):
        try:
            best = max(best, image_tokens(pixels[1] // h, h, resize, pixels, bounds))
        except ValueError:  # an aspect ratio above 200
            continue
    return best


def to_rgb(image: PIL.Image.Image, source: str = "<image>") -> PIL.Image.Image:
    """Decodes `image` and converts it to RGB, compositing transparency onto white as
    transformers' `convert_to_rgb` does. A corrupt or truncated file raises ValueError."""
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"{source}: expected a PIL image, got {type(image).__name__}")
    try:
        image.load()
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for corrupt data
        raise ValueError(f"{source}: corrupt or unreadable image: {e}") from e
