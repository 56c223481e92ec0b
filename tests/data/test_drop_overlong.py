"""Prompts over rl.max_prompt_len are dropped when the data set is built, counted and named,
not raised (spec section 5, filter_overlong_prompts), counting the tokens the official filter
counts."""

import io

import numpy as np
import PIL.Image
import pytest
from official_images import CHECKPOINT_PIXELS, OFFICIAL_PIXELS, official_first_stage, official_processor

from emor3_jax.data.encode import Encoder
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.data.sources import drop_overlong, require_set_answers
from emor3_jax.data.tokenizers import build_test_tokenizer, special_token_ids
from emor3_jax.emo_r3.rewards import format_score
from emor3_jax.models.api import preset

# id -> (prompt tokens, image tokens, image tokens at min_pixels); limit 100.
LENGTHS = {
    "fits": (100, 60, 20),  # exactly the limit: kept
    "long": (101, 60, 20),  # over by one: dropped; at min_pixels 101 - 60 + 20 = 61 fits
    "huge": (300, 150, 140),  # dropped; at min_pixels 300 - 150 + 140 = 290 still over
    "short": (10, 4, 4),
}


def test_overlong_prompts_are_dropped_counted_and_named_not_raised():
    dropped = []
    records = [{"id": rid} for rid in LENGTHS]
    kept = list(drop_overlong(records, lambda r: LENGTHS[r["id"]], 100, dropped))
    assert [r["id"] for r in kept] == ["fits", "short"]
    assert dropped == [
        {"id": "long", "tokens": 101, "image_tokens": 60, "too_large_at_min_pixels": False},
        {"id": "huge", "tokens": 300, "image_tokens": 150, "too_large_at_min_pixels": True},
    ]


def test_a_cold_start_without_set_answers_stops_naming_the_field():
    set_answer = "<step1>a storm</step1><step2>afraid</step2><step3>negative, high</step3>\\boxed{fear}"
    records = [{"id": "a", "answer": set_answer}, {"id": "b", "answer": "fear"}]  # b: a bare label
    it = require_set_answers(records, format_score, "answer")
    assert next(it)["id"] == "a"
    with pytest.raises(ValueError, match=r"record 'b': field 'answer' is not a SET answer.*got 'fear'"):
        next(it)


# ---------------------------------------------------------------------------
# The count compared with the limit: the official filter_overlong_prompts'.


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    tok = build_test_tokenizer(str(tmp_path_factory.mktemp("tok")))
    cfg = preset("tiny", vocab_size=len(tok), special_ids=special_token_ids(tok))
    lo, hi = OFFICIAL_PIXELS
    two = ImageProcessor(min_pixels=lo, max_pixels=hi, resize="two_stage", checkpoint_pixels=CHECKPOINT_PIXELS)
    one = ImageProcessor(min_pixels=lo, max_pixels=hi)
    return {name: Encoder(tok, p, cfg, ("awe", "fear"), 2048) for name, p in (("two", two), ("one", one))}


def _record(width, height, fmt="PNG"):
    buf = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (200, 90, 30)).save(buf, format=fmt)
    return {"id": f"{width}x{height}", "image": buf.getvalue()}


TEXT = "<image>\nWhich emotion does this image evoke?"


@pytest.mark.parametrize(
    "width, height", [(500, 375), (20, 20), (30, 3000), (4000, 60), (1920, 1080), (3000, 2000), (27235, 154)]
)
def test_prompt_length_is_the_official_filters_count(encoders, width, height):
    """filter_overlong_prompts (verl/utils/dataset.py:200-213) compares the processor's input_ids,
    the one <|image_pad|> of the chat template expanded to the image's tokens, with
    max_prompt_length; the image sized by process_image, then the checkpoint's processor."""
    enc, record = encoders["two"], _record(width, height)
    image = official_first_stage(PIL.Image.open(io.BytesIO(record["image"])))
    grid = np.asarray(official_processor()(images=[image], return_tensors=None)["image_grid_thw"])[0]
    official = len(enc.prompt_ids(TEXT)) - 1 + int(np.prod(grid)) // 4
    tokens, image_tokens, _ = enc.prompt_length(record, TEXT)
    assert (tokens, image_tokens) == (official, int(np.prod(grid)) // 4)


def test_two_stage_keeps_a_prompt_one_stage_drops(encoders):
    """500 x 375: 336 image tokens in two stages, 352 in one; at a limit between the two the
    official pipeline keeps the record and ours drops it."""
    record = _record(500, 375, "JPEG")
    text = len(encoders["two"].prompt_ids(TEXT)) - 1
    limit = text + 340
    kept = {}
    for name, enc in encoders.items():
        dropped = []
        kept[name] = list(drop_overlong([record], lambda r: enc.prompt_length(r, TEXT), limit, dropped))
        assert [d["image_tokens"] for d in dropped] == ([] if name == "two" else [352])
    assert len(kept["two"]) == 1 and kept["one"] == []
