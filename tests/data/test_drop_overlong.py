"""Prompts over rl.max_prompt_len are dropped when the data set is built, counted and named,
not raised (spec section 5, filter_overlong_prompts)."""

import pytest

from emor3_jax.data.sources import drop_overlong, require_set_answers
from emor3_jax.emo_r3.rewards import format_score

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
