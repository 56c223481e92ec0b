"""The official run's image sizing, transcribed as a test reference (not imported by emor3_jax):
EasyR1's process_image (/work/ref/emo-r3 verl/utils/dataset.py:54-78) with the run's pixels
(examples/config.yaml), then the checkpoint's own processor at its preprocessor_config.json's
pixels, here transformers' Qwen2VLImageProcessorPil."""

import math

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

OFFICIAL_PIXELS = (512 * 512, 2048 * 2048)  # examples/config.yaml: min_pixels 262144, max_pixels 4194304
CHECKPOINT_PIXELS = (3136, 12845056)  # Qwen2.5-VL-3B/7B-Instruct preprocessor_config.json


def official_first_stage(image, min_pixels=OFFICIAL_PIXELS[0], max_pixels=OFFICIAL_PIXELS[1]):
    """process_image on a PIL image: two separate checks, int() truncation, PIL's default resize
    filter for the image's mode, RGB conversion last."""
    if image.width * image.height > max_pixels:
        f = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))
    if image.width * image.height < min_pixels:
        f = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))
    return image if image.mode == "RGB" else image.convert("RGB")


def official_processor() -> Qwen2VLImageProcessorPil:
    """The checkpoint's image processor (the second stage)."""
    return Qwen2VLImageProcessorPil(min_pixels=CHECKPOINT_PIXELS[0], max_pixels=CHECKPOINT_PIXELS[1])
