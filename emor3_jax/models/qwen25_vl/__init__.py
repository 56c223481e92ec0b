"""Qwen2.5-VL in Flax NNX: vision tower, M-RoPE decoder, HF weight conversion."""

from emor3_jax.models.qwen25_vl.config import ModelConfig, TextConfig, VisionConfig
from emor3_jax.models.qwen25_vl.model import Qwen25VL

__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "Qwen25VL"]
