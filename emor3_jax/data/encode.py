"""Records -> model inputs on the host: prompts for the sampler, padded SFT batches.

A record is {"id", "image" (encoded bytes), "label", "problem", "answer"} (see data/sources).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from emor3_jax.core.batches import Prompt, bucket, prompt_images
from emor3_jax.data import prompts
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.models.api import ModelConfig, prepare_inputs

# How `Encoder.prompt` cuts a prompt over rl.max_prompt_len on the right (reward.reflection_cut):
#   unexpanded  the image counts as its one <|image_pad|> token, as the official run's vLLM prompt
#               (EasyR1's raw_prompt_ids, cut at max_prompt_length: verl/utils/dataset.py:308-313,
#               truncation="right" for reflections: verl/trainer/data_loader.py:121); the image is
#               expanded after the cut, so the prompt may pass the limit by its tokens - 1.
#   expanded    the image's tokens count: the prompt stays within the limit (ours).
CUTS = ("unexpanded", "expanded")


class Encoder:
    def __init__(self, tokenizer, processor: ImageProcessor, cfg: ModelConfig, labels, max_prompt_len: int):
        self.tok, self.processor, self.cfg = tokenizer, processor, cfg
        self.labels = tuple(labels)
        self.max_prompt_len = max_prompt_len

    def image(self, record) -> tuple[np.ndarray, np.ndarray]:
        """pixel rows [L, C] and grid [1, 3] of the record's image."""
        try:
            img = Image.open(io.BytesIO(record["image"]))
            img.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad record
            raise ValueError(f"record {record.get('id')!r}: unreadable image ({e})") from e
        pixels, grid = self.processor(img, source=f"record {record.get('id')!r}")
        return pixels, np.asarray(grid).reshape(1, 3)

    def question(self, record) -> str:
        return record.get("problem") or prompts.question(self.labels)

    def prompt_ids(self, text: str, grid=None) -> np.ndarray:
        """Token ids [T] of the chat-template prompt of `text`, image tokens expanded; any length."""
        ids = prompts.encode_prompt(self.tok, text)
        if grid is not None:
            ids = prompts.expand_image_tokens(ids, grid, self.cfg.image_token_id, self.cfg.vision.spatial_merge_size)
        return ids

    def prompt(self, text: str, pixels=None, grid=None, what: str = "prompt", cut: str | None = None) -> Prompt:
        """A chat-template prompt of `text` (`<image>` marks the image, if any). Over
        rl.max_prompt_len it raises, or with `cut` (CUTS) keeps its first max_prompt_len tokens
        (the official run's truncation of reflection prompts, spec section 5)."""
        if cut is not None and cut not in CUTS:
            raise ValueError(f"{what}: cut must be one of {CUTS}, got {cut!r}")
        ids = self.prompt_ids(text, grid if cut != "unexpanded" else None)
        if len(ids) > self.max_prompt_len:
            if cut is None:
                raise ValueError(f"{what}: {len(ids)} tokens exceed rl.max_prompt_len={self.max_prompt_len}")
            image_end = np.flatnonzero(ids == self.cfg.image_token_id)
            if len(image_end) and image_end[-1] >= self.max_prompt_len:
                raise ValueError(
                    f"{what}: cutting {len(ids)} tokens to rl.max_prompt_len={self.max_prompt_len} would cut its image"
                )
            ids = ids[: self.max_prompt_len]
        if cut == "unexpanded" and grid is not None:
            ids = prompts.expand_image_tokens(ids, grid, self.cfg.image_token_id, self.cfg.vision.spatial_merge_size)
        return Prompt(ids, pixels, grid)

    def prompt_length(self, record, text: str) -> tuple[int, int, int]:
        """(prompt tokens, image tokens, image tokens at data.min_pixels) of prompt `text` with
        the record's image, from the image's size alone (nothing is decoded or resized): the
        count the official filter_overlong_prompts compares with max_prompt_length (the
        processor's expanded input_ids, verl/utils/dataset.py:200-213)."""
        try:
            with Image.open(io.BytesIO(record["image"])) as img:
                width, height = img.size
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad record
            raise ValueError(f"record {record.get('id')!r}: unreadable image ({e})") from e
        try:
            tokens = [self.processor.image_tokens(width, height, hi) for hi in (None, self.processor.min_pixels)]
        except ValueError as e:  # an aspect ratio above 200
            raise ValueError(f"record {record.get('id')!r}: image {width}x{height}: {e}") from e
        m = self.cfg.vision.spatial_merge_size
        grid = np.array([[1, m, m]])  # keeps the template's one image token; the count is added below
        n_text = len(self.prompt_ids(text, grid)) - 1
        return n_text + tokens[0], tokens[0], tokens[1]

    def record_prompt(self, record, text: str) -> Prompt:
        """The prompt `text` (its `<image>` marks the record's image) with the record's image."""
        pixels, grid = self.image(record)
        return self.prompt(text, pixels, grid, f"record {record.get('id')!r}")

    def sft_example(self, record, text: str):
        """(ids [T], answer mask [T], pixels, grid) of prompt `text` + the record's reference answer."""
        if not record.get("answer"):
            raise ValueError(f"record {record.get('id')!r}: no reference answer for the cold start")
        return self.sft_pair(text, record["answer"], record)

    def sft_pair(self, text: str, answer: str, image_record=None):
        """(ids [T], answer mask [T], pixels, grid) of prompt `text` + `answer`; with
        `image_record` its image fills the prompt's `<image>`, without one pixels and grid are
        None (a text-only example)."""
        ids, mask = prompts.encode_for_sft(self.tok, text, answer)
        if image_record is None:
            return ids, mask, None, None
        pixels, grid = self.image(image_record)
        n_before = len(ids)
        ids = prompts.expand_image_tokens(ids, grid, self.cfg.image_token_id, self.cfg.vision.spatial_merge_size)
        mask = np.concatenate([np.zeros(len(ids) - n_before, bool), mask])  # the image sits in the prompt
        return ids, mask, pixels, grid

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        """Sampled rows [R, G] cut at their lengths [R] -> texts, special tokens skipped."""
        return [self.tok.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(tokens, lengths)]


def sft_batch(examples, cfg: ModelConfig, pad_id: int, buckets) -> tuple[dict, np.ndarray]:
    """Right-padded batch (prepare_inputs arrays) and the loss mask [R, T-1] over next tokens.
    Examples without an image (pixels None) may be mixed with examples with one."""
    t = bucket(max(len(e[0]) for e in examples), buckets, "cold-start example length")
    ids = np.full((len(examples), t), pad_id, np.int64)
    attn = np.zeros((len(examples), t), np.int64)
    loss = np.zeros((len(examples), t), bool)
    for i, (e_ids, e_mask, _, _) in enumerate(examples):
        ids[i, : len(e_ids)] = e_ids
        attn[i, : len(e_ids)] = 1
        loss[i, : len(e_ids)] = e_mask
    pixels, grids, image_index = prompt_images([Prompt(e[0], e[2], e[3]) for e in examples])
    inputs = prepare_inputs(cfg, ids, attn, pixels, grids, image_index=image_index)
    inputs.pop("rope_deltas")
    return inputs, loss[:, 1:].astype(np.float32)
