"""Reflection prompts over rl.max_prompt_len: emo_r3_code cuts them on the right (the official
run, spec section 5), counting an image as one token (reward.reflection_cut="unexpanded", the
official count) or as its tokens ("expanded"); robust shortens the quoted reasoning and keeps
the question whole."""

import dataclasses
import io

import numpy as np
import PIL.Image
import pytest

from configs.qwen_vl import get_config
from emor3_jax.core.batches import Prompt
from emor3_jax.data import prompts
from emor3_jax.data.encode import Encoder
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.data.tokenizers import build_test_tokenizer, special_token_ids
from emor3_jax.emo_r3 import rewards
from emor3_jax.emo_r3.task import EmoR3, Reflection, longest_reflection_prompt
from emor3_jax.models.api import preset
from emor3_jax.sampling.methods import GREEDY

LABELS = ("awe", "fear")
LONG = "<step1>" + "a storm over the sea " * 100 + "</step1><step2>afraid</step2><step3>neg</step3>\\boxed{fear}"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tok = build_test_tokenizer(str(tmp_path_factory.mktemp("tok")))
    cfg = preset("tiny", vocab_size=len(tok), special_ids=special_token_ids(tok))
    enc = Encoder(tok, ImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56), cfg, LABELS, 10**6)
    # The limit: the question with 30 tokens of quoted reasoning (LONG quotes far more).
    enc.max_prompt_len = len(enc.prompt_ids(rewards.text_reflection_question("", LABELS))) + 30
    return enc


def _task(compat):
    cfg = rewards.RewardConfig(compat=compat)
    return EmoR3(labels=LABELS, reward=cfg, reflection=Reflection(max_new=8, params=GREEDY))


def test_official_mode_keeps_the_first_max_prompt_len_tokens(encoder):
    q, p = _task("emo_r3_code")._reflection_prompt(encoder, "text", LONG, Prompt(None))
    full = encoder.prompt_ids(q)
    assert len(full) > encoder.max_prompt_len  # the uncut prompt would not fit
    assert (
        p.ids.tolist() == full[: encoder.max_prompt_len].tolist()
    )  # cut on the right (a left cut keeps full[-limit:])


def test_robust_mode_shortens_the_reasoning_and_keeps_the_question(encoder):
    q, p = _task("robust")._reflection_prompt(encoder, "text", LONG, Prompt(None))
    assert len(p.ids) <= encoder.max_prompt_len
    assert q.endswith(
        "Which emotion best describes the text above?\n"
        "Answer the question using one emotional category (one word only): awe, fear."
    )
    assert q.startswith("<step1>a storm") and len(q) < len(rewards.text_span(LONG))


# ---------------------------------------------------------------------------
# Image reflections at the official limit: EasyR1 cuts the vLLM prompt (raw_prompt_ids, one
# <|image_pad|> per image) at max_prompt_length, and vLLM expands the image after the cut.


@pytest.fixture(scope="module")
def image_case(encoder):
    """(encoder with 64-token images, the record's rollout prompt, the image's tokens)."""
    enc = Encoder(encoder.tok, ImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64), encoder.cfg, LABELS, 10**6)
    buf = io.BytesIO()
    PIL.Image.new("RGB", (224, 224), (40, 90, 200)).save(buf, format="PNG")
    pixels, grid = enc.image({"id": "r", "image": buf.getvalue()})
    return enc, Prompt(None, pixels, grid), int(np.prod(grid)) // 4


def _image_question(response):
    return rewards.image_reflection_prompt(response, "emo_r3_code")


def _expand(enc, ids, grid):
    return prompts.expand_image_tokens(ids, grid, enc.cfg.image_token_id, enc.cfg.vision.spatial_merge_size)


def _official(cut):
    return dataclasses.replace(_task("emo_r3_code"), reflection_cut=cut)


def test_official_cut_keeps_max_prompt_len_tokens_with_the_image_as_one(image_case):
    enc, src, image_tokens = image_case
    raw = enc.prompt_ids(_image_question(LONG))  # the vLLM prompt before the cut: one <|image_pad|>
    enc.max_prompt_len = len(raw) - 25
    q, p = _official("unexpanded")._reflection_prompt(enc, "image", LONG, src)
    assert p.ids.tolist() == _expand(enc, raw[: enc.max_prompt_len], src.image_grid_thw).tolist()
    assert len(p.ids) == enc.max_prompt_len - 1 + image_tokens  # past the limit by the image's tokens - 1
    # Ours counts the image's 64 tokens: 63 more tokens of the question go.
    _, ours = _official("expanded")._reflection_prompt(enc, "image", LONG, src)
    assert ours.ids.tolist() == _expand(enc, raw, src.image_grid_thw)[: enc.max_prompt_len].tolist()


def test_an_image_reflection_the_official_run_does_not_cut(image_case):
    """A question that fits the limit with its image as one token is kept whole, assistant turn
    included, though with the image's tokens it is past the limit; ours cuts its end."""
    enc, src, image_tokens = image_case
    raw = enc.prompt_ids(_image_question(LONG))
    enc.max_prompt_len = len(raw)  # exactly the limit
    _, p = _official("unexpanded")._reflection_prompt(enc, "image", LONG, src)
    assert p.ids.tolist() == _expand(enc, raw, src.image_grid_thw).tolist()
    assert len(p.ids) == len(raw) - 1 + image_tokens > enc.max_prompt_len
    _, ours = _official("expanded")._reflection_prompt(enc, "image", LONG, src)
    assert len(ours.ids) == enc.max_prompt_len and ours.ids[-1] != raw[-1]


def test_the_longest_official_reflection_fits_the_samplers_bound(image_case):
    """A record whose rollout prompt is exactly rl.max_prompt_len (L) and a response far longer:
    its image reflection takes L - 1 + the image's tokens, within longest_reflection_prompt's
    2L - 3, which validation makes sampling.prompt_buckets reach."""
    enc, src, image_tokens = image_case
    enc.max_prompt_len = limit = len(enc.prompt_ids("<image>\nWhich emotion?", src.image_grid_thw))
    long = "<step1>" + "a storm over the sea " * 400 + "</step1><step2>afraid</step2>\\boxed{fear}"
    _, p = _official("unexpanded")._reflection_prompt(enc, "image", long, src)
    c = get_config("3b")
    c.rl.max_prompt_len = limit
    assert len(p.ids) == limit - 1 + image_tokens <= longest_reflection_prompt(c) == 2 * limit - 3
    c.reward.reflection_cut = "expanded"
    assert longest_reflection_prompt(c) == limit
