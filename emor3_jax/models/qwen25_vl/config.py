"""Model configuration: dataclasses read from and written to a Hugging Face `config.json`.

Both forms of the HF config are read: the flat hub form (text fields at top level,
`rope_scaling={"type": "mrope", ...}`) and transformers v5's nested form (`text_config`,
`vision_config`, `rope_parameters`). `to_hf_dict` writes the nested form.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath

from emor3_jax.models import lora
from emor3_jax.models.qwen25_vl.stack import REMAT_POLICIES

# xla / cudnn: jax.nn.dot_product_attention; einsum: explicit; splash (TPU) / flash (GPU): the
# fused Pallas kernels of fused_attention (interpret mode on CPU).
ATTENTION_IMPLS = ("xla", "cudnn", "einsum", "splash", "flash")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    in_channels: int = 3
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merge_units(self) -> int:
        """Side of an attention window, in merged (2x2-patch) units."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mrope_section: tuple[int, int, int]
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (from HF) plus how we run it (dtypes, attention path: not exported)."""

    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    attention_impl: str = "xla"
    remat: bool = False  # recompute each decoder layer in the backward pass (training memory)
    remat_policy: str = "nothing"  # what a recomputed layer keeps: stack.REMAT_POLICIES
    # The layer loops unrolled (one body per layer) instead of scanned: compiles take longer with
    # depth, but a tiny model on CPU runs markedly faster (a loop's per-iteration cost dominates).
    unroll_layers: bool = False
    # Allowed patch counts of one batch's images (increasing multiples of the merge unit): the
    # vision inputs are padded to the smallest that holds them, so the number of compiled
    # programs depends on these, not on image sizes. Empty: no padding (a shape per batch).
    vision_buckets: tuple[int, ...] = ()
    # LoRA adapters (models/lora.py): rank 0 = none (full fine-tuning); alpha / rank scales their
    # term; targets names the projection groups (lora.TARGETS) that get one.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attention", "mlp")

    def __post_init__(self):
        _validate(self)

    @property
    def layer_remat(self) -> str | None:
        """The REMAT_POLICIES name the layer stacks recompute with; None without remat."""
        return self.remat_policy if self.remat else None

    def adapter(self, group: str) -> lora.Adapter | None:
        """The LoRA adapter of projection group `group` (a lora.TARGETS name), None without one."""
        return lora.adapter(self.lora_rank, self.lora_alpha, self.lora_targets, group)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime) -> ModelConfig:
        """Reads a HF Qwen2.5-VL config dict (flat hub form or nested v5 form)."""
        model_type = d.get("model_type")
        if model_type != "qwen2_5_vl":
            raise ValueError(
                f"config.json: model_type is {model_type!r}, expected 'qwen2_5_vl' "
                "(this is not a Qwen2.5-VL checkpoint)"
            )
        t = dict(d.get("text_config") or d)  # flat form keeps text fields at top level
        if t.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported (no Qwen2.5-VL release uses it)")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ValueError("config.json: no mrope_section in rope_parameters/rope_scaling")
        rope_theta = rope.get("rope_theta", t.get("rope_theta", d.get("rope_theta", 1000000.0)))
        text = TextConfig(
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_layers=t["num_hidden_layers"],
            num_heads=t["num_attention_heads"],
            num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            mrope_section=tuple(rope["mrope_section"]),
            rope_theta=float(rope_theta),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            max_position_embeddings=t.get("max_position_embeddings", 128000),
            hidden_act=t.get("hidden_act", "silu"),
            bos_token_id=t.get("bos_token_id", d.get("bos_token_id")),
            eos_token_id=t.get("eos_token_id", d.get("eos_token_id")),
        )
        v = d["vision_config"]
        vrope = v.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=v["depth"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_heads=v["num_heads"],
            out_hidden_size=v["out_hidden_size"],
            fullatt_block_indexes=tuple(v["fullatt_block_indexes"]),
            patch_size=v.get("patch_size", 14),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            window_size=v.get("window_size", 112),
            in_channels=v.get("in_channels", v.get("in_chans", 3)),
            tokens_per_second=v.get("tokens_per_second", 4),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            hidden_act=v.get("hidden_act", "silu"),
        )
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        return cls(
            text=text,
            vision=vision,
            tie_word_embeddings=bool(tie),
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            **runtime,
        )

    @classmethod
    def from_hf_dir(cls, path: str, **runtime) -> ModelConfig:
        f = epath.Path(path, "config.json")  # local or a URI
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no config.json (expected a Hugging Face checkpoint directory)")
        return cls.from_hf_dict(json.loads(f.read_text()), **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """The nested (transformers v5) config.json form; transformers reads it back."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "dtype": self.param_dtype,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "hidden_act": t.hidden_act,
                "max_position_embeddings": t.max_position_embeddings,
                "rms_norm_eps": t.rms_norm_eps,
                "use_sliding_window": False,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": list(t.mrope_section),
                },
                "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id,
                "tie_word_embeddings": self.tie_word_embeddings,
            },
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "in_channels": v.in_channels,
                "tokens_per_second": v.tokens_per_second,
                "hidden_act": v.hidden_act,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }


def _validate(c: ModelConfig) -> None:
    t, v = c.text, c.vision
    if c.param_dtype not in DTYPES or c.compute_dtype not in DTYPES:
        raise ValueError(f"param_dtype/compute_dtype must be in {DTYPES}, got {c.param_dtype!r}/{c.compute_dtype!r}")
    if c.lora_rank < 0 or (c.lora_rank and (c.lora_alpha <= 0 or set(c.lora_targets) - set(lora.TARGETS))):
        raise ValueError(
            f"lora: rank {c.lora_rank} must be >= 0, alpha {c.lora_alpha} > 0 and targets {list(c.lora_targets)} "
            f"within {tuple(lora.TARGETS)}"
        )
    if c.lora_rank and "lm_head" in c.lora_targets and c.tie_word_embeddings:
        raise ValueError(
            "lora.targets has 'lm_head', but this model ties its lm_head to the token embedding "
            "(tie_word_embeddings, e.g. Qwen2.5-VL-3B): there is no separate projection to adapt; drop 'lm_head'"
        )
    if c.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got {c.remat_policy!r}")
    if c.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {c.attention_impl!r}")
    if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
        raise ValueError(
            f"text: hidden_size {t.hidden_size} / num_heads {t.num_heads} / num_kv_heads {t.num_kv_heads} "
            "must divide evenly"
        )
    if 2 * sum(t.mrope_section) != t.head_dim:
        raise ValueError(f"text: 2 * sum(mrope_section={list(t.mrope_section)}) must equal head_dim {t.head_dim}")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
        raise ValueError(f"vision: head_dim {v.hidden_size}/{v.num_heads} must be an integer divisible by 4")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
        raise ValueError(f"vision: fullatt_block_indexes {list(v.fullatt_block_indexes)} outside depth {v.depth}")
    if v.window_size % (v.spatial_merge_size * v.patch_size):
        raise ValueError(f"vision: window_size {v.window_size} is not a multiple of merge*patch")
    b = c.vision_buckets
    if any(n <= 0 or n % v.merge_unit for n in b) or list(b) != sorted(set(b)):
        raise ValueError(
            f"vision_buckets {list(b)} must be increasing positive multiples of the merge unit {v.merge_unit}"
        )
    for name, act in (("text", t.hidden_act), ("vision", v.hidden_act)):
        if act != "silu":
            raise ValueError(f"{name}: hidden_act {act!r} not supported (Qwen2.5-VL uses 'silu')")


# Qwen's special tokens a tiny model needs ids for (the tokenizer it is sized to gives them).
TINY_SPECIAL = ("<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def preset(name: str, *, vocab_size: int | None = None, special_ids: dict | None = None, **runtime) -> ModelConfig:
    """Named architectures: Qwen2.5-VL-{3B,7B}-Instruct (no download needed) and "tiny", the
    random 2-layer model of the CPU default run, tests and bench smoke runs.

    tiny is sized to a tokenizer: `vocab_size` (required) and `special_ids`, Qwen's special
    token -> id for TINY_SPECIAL (None: the last five ids of the vocabulary).
    """
    if name == "tiny":
        return _tiny(vocab_size, special_ids, **runtime)
    common_v = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        fullatt_block_indexes=(7, 15, 23, 31),
        tokens_per_second=2,
    )
    presets = {  # name: (text fields, tied embeddings)
        "3b": (
            dict(
                vocab_size=151936,
                hidden_size=2048,
                intermediate_size=11008,
                num_layers=36,
                num_heads=16,
                num_kv_heads=2,
            ),
            True,
        ),
        "7b": (
            dict(
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_layers=28,
                num_heads=28,
                num_kv_heads=4,
            ),
            False,
        ),
    }
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(presets) + ['tiny']}")
    t, tie = presets[name]
    text = TextConfig(mrope_section=(16, 24, 24), **t)
    vision = VisionConfig(out_hidden_size=text.hidden_size, **common_v)
    return ModelConfig(text=text, vision=vision, tie_word_embeddings=tie, **runtime)


def _tiny(vocab_size: int | None, special_ids: dict | None, **runtime) -> ModelConfig:
    if not vocab_size:
        raise ValueError("the tiny preset needs vocab_size (the size of the tokenizer it is used with)")
    ids = special_ids or {tok: vocab_size - 5 + i for i, tok in enumerate(TINY_SPECIAL)}
    text = TextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(4, 6, 6),
        rope_theta=10000.0,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
    )
    vision = VisionConfig(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, fullatt_block_indexes=(1,)
    )
    return ModelConfig(
        text=text,
        vision=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **runtime,
    )
