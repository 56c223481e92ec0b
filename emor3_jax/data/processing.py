"""Images -> Qwen2.5-VL patch rows, with transformers' PIL image processor (no torchvision).

Letters: L patch rows (t * h * w, in merge-block order), C = 3 * 2 * 14 * 14 = 1176 values
per row (channel, time, patch row, patch column).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

MIN_SIDE = 28  # patch_size * merge_size: the smallest image side the processor accepts


class ImageProcessor:
    """Resizes an image so that min_pixels <= H * W <= max_pixels with H, W multiples of 28
    (Qwen's smart_resize), normalises it with the CLIP mean/std and cuts it into patches.

    The spec's training setting is min_pixels = 512 * 512, max_pixels = 2048 * 2048.
    """

    def __init__(self, *, min_pixels: int, max_pixels: int):
        if not MIN_SIDE * MIN_SIDE <= min_pixels <= max_pixels:
            raise ValueError(
                f"ImageProcessor: need {MIN_SIDE * MIN_SIDE} <= min_pixels <= max_pixels, "
                f"got min_pixels={min_pixels}, max_pixels={max_pixels}"
            )
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.hf = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
        self.merge_size = self.hf.merge_size

    def __call__(self, image: PIL.Image.Image, source: str = "<image>") -> tuple[np.ndarray, np.ndarray]:
        """Returns (pixel_values [L, 1176] float32, grid_thw [3] int64), L = t * h * w.

        `source` names the image (file, data set row) in errors: a corrupt image, one
        smaller than 28x28 or with an aspect ratio above 200 raises ValueError.
        """
        rgb = to_rgb(image, source)
        width, height = rgb.size
        if width < MIN_SIDE or height < MIN_SIDE:
            raise ValueError(f"{source}: image is {width}x{height}, smaller than the {MIN_SIDE}x{MIN_SIDE} minimum")
        try:
            out = self.hf(images=[rgb], return_tensors=None)
        except ValueError as e:  # smart_resize: aspect ratio above 200
            raise ValueError(f"{source}: image {width}x{height}: {e}") from e
        pixel_values = np.asarray(out["pixel_values"], np.float32)
        grid_thw = np.asarray(out["image_grid_thw"], np.int64).reshape(3)
        if pixel_values.shape[0] != np.prod(grid_thw):
            raise AssertionError(f"{source}: {pixel_values.shape[0]} patch rows for grid {grid_thw.tolist()}")
        return pixel_values, grid_thw


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
