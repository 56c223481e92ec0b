"""Filters on a stream of records: skipping bad ones (`checked`), dropping prompts over the
length limit (`drop_overlong`), and requiring SET answers for a cold start (`require_set_answers`)."""

import logging
import types
from collections.abc import Callable, Iterable, Iterator

from emor3_jax.data.sources.common import BadRecord

log = logging.getLogger(__name__)

# `checked` applies the bad-fraction limit only once this many records were seen.
MIN_SEEN_FOR_LIMIT = 20


# ---------------------------------------------------------------------------
# Skipping bad records.


def checked(records: Iterable[dict], skip_bad: bool, max_bad_fraction: float, counter: dict) -> Iterator[dict]:
    """Passes records through; counts, and optionally skips, those that raise BadRecord.

    With `skip_bad` False the first BadRecord is re-raised. With True it is logged
    and skipped. `counter["seen"]` counts every record drawn (good and bad),
    `counter["bad"]` the skipped ones. The rule: once at least
    MIN_SEEN_FOR_LIMIT (20) records were seen, and again at the end of the stream
    whatever the count, a bad/seen above `max_bad_fraction` raises RuntimeError
    naming the fraction and the limit (so a broken data set stops early instead
    of training on what little is left).

    Skipping needs a reader from this package (or any iterator that stays usable
    after raising); a plain generator ends on its first exception, so skipping
    inside one raises TypeError instead of silently dropping the rest.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    counter.setdefault("seen", 0)
    counter.setdefault("bad", 0)

    def over_limit() -> bool:
        return counter["seen"] > 0 and counter["bad"] / counter["seen"] > max_bad_fraction

    def fail(last: BadRecord):
        raise RuntimeError(
            f"too many bad records: {counter['bad']} of {counter['seen']} seen "
            f"({counter['bad'] / counter['seen']:.1%}) exceeds max_bad_fraction={max_bad_fraction}; last: {last}. "
            "Fix or remove those records, or allow more with --config.data.max_bad_fraction"
        )

    it = iter(records)
    last_bad = None
    while True:
        try:
            record = next(it)
        except StopIteration:
            break
        except BadRecord as e:
            if not skip_bad:
                raise
            if isinstance(it, types.GeneratorType):
                raise TypeError(
                    "cannot skip a bad record inside a generator (it has ended); "
                    "read through emor3_jax.data.sources readers"
                ) from e
            counter["seen"] += 1
            counter["bad"] += 1
            last_bad = e
            log.warning("skipping bad record: %s", e)
            if counter["seen"] >= MIN_SEEN_FOR_LIMIT and over_limit():
                fail(e)
            continue
        counter["seen"] += 1
        if last_bad is not None and counter["seen"] >= MIN_SEEN_FOR_LIMIT and over_limit():
            fail(last_bad)
        yield record
    if last_bad is not None and over_limit():
        fail(last_bad)


# ---------------------------------------------------------------------------
# Dropping prompts over the length limit.


def drop_overlong(
    records: Iterable[dict], prompt_length: Callable[[dict], tuple[int, int, int]], limit: int, dropped: list
) -> Iterator[dict]:
    """Passes the records whose prompt fits `limit` tokens (the official run's
    filter_overlong_prompts: a long prompt is dropped when the data set is built, it does not
    stop the run). `prompt_length(record)` gives (prompt tokens, image tokens, image tokens at
    min_pixels); each dropped record is appended to `dropped` as {"id", "tokens",
    "image_tokens", "too_large_at_min_pixels"} (True: its prompt would not fit even with the
    image at data.min_pixels) and logged by id."""
    for record in records:
        tokens, image, at_min = prompt_length(record)
        if tokens <= limit:
            yield record
            continue
        at_min_too_large = tokens - image + at_min > limit
        dropped.append(
            {"id": record["id"], "tokens": tokens, "image_tokens": image, "too_large_at_min_pixels": at_min_too_large}
        )
        why = f"; even at data.min_pixels its image takes {at_min} tokens" if at_min_too_large else ""
        log.warning(
            "dropping record %r: its prompt has %d tokens > rl.max_prompt_len=%d%s", record["id"], tokens, limit, why
        )


def require_set_answers(records: Iterable[dict], is_set_answer: Callable[[str], bool], field: str) -> Iterator[dict]:
    """Passes records whose `answer` (read from the source's `field`) is a SET-formatted answer
    (`is_set_answer`, e.g. rewards.format_score); the first one that is not stops the build
    naming the record and the field, so a cold start never trains on bare labels."""
    for record in records:
        if record["answer"] and not is_set_answer(record["answer"]):  # none at all: the trainer counts those
            raise ValueError(
                f"record {record['id']!r}: field {field!r} is not a SET answer (<step1>..</step1><step2>..</step2>"
                f"<step3>..</step3> then \\boxed{{label}}), got {record['answer'][:80]!r}; the cold start would "
                "train on it: use data with SET answers, or --config.cold_start.steps=0"
            )
        yield record
