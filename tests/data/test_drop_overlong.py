"""Prompts over rl.max_prompt_len are dropped when the data set is built, counted and named,
not raised (spec section 5, filter_overlong_prompts)."""

from emor3_jax.data.sources import drop_overlong

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
