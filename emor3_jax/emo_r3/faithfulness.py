"""Ground-truth faithfulness of SET responses, for data sets whose records carry a truth.

No judge: the synthetic set knows what each image shows (`record["truth"]`, see
synthetic.make_example), and its vocabulary (synthetic.FIGURES, SIZE_WORDS, LIGHTS, FEELINGS
and prompts.VALENCE_AROUSAL) says which words name which figure, size, light and feeling.

- image-faithful: step 1 (the image span the consistency judge reads) names the drawn
  figure (its colour word and noun) and no other figure of the vocabulary, with the image's
  detail (synthetic.DETAILS, the one the truth holds): its size class (SIZE_WORDS; no size
  word means medium), or its light (LIGHTS) and no other light.
- answer-coherent: the boxed answer is one of the labels; step 2 (inside the text span the
  coherence judge reads) holds at least one feeling word and all its feeling words belong to
  the boxed label; step 3 states exactly the boxed label's valence and arousal.

A response without the reward's spans (rewards.image_span / text_span empty) is neither.
Words are compared lower-cased, as whole words.

  flags = score(response, parse_truth(record["truth"]), labels)
  # {"image_faithful": bool, "answer_coherent": bool}
  rates = aggregate([record["label"] for ...], [flags for ...])
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from emor3_jax.data.prompts import VALENCE_AROUSAL
from emor3_jax.data.synthetic import DETAILS, FEELINGS, FIGURES, LIGHTS, SIZE_WORDS, detail_of
from emor3_jax.emo_r3 import rewards

KEYS = ("image_faithful", "answer_coherent")
TRUTH_KEYS = ("figure", "colour")  # what image_faithful reads, with one key of DETAILS

_NOUNS = frozenset(noun.lower() for _, noun in FIGURES.values())
_COLOURS = frozenset(colour for colour, _ in FIGURES.values())
_SIZE_CLASS = {word: k for k, word in enumerate(SIZE_WORDS) if word}
_MEDIUM = SIZE_WORDS.index("")
_LIGHT_CLASS = {word: k for k, word in enumerate(LIGHTS)}
_FEELING_LABEL = {word: label for label, words in FEELINGS.items() for word in words}
_VALENCES = frozenset(v for v, _ in VALENCE_AROUSAL.values())
_AROUSALS = frozenset(a for _, a in VALENCE_AROUSAL.values())
_TAG = re.compile(r"<[^<>]*>")
_WORD = re.compile(r"[a-z]+")
_STEP2 = re.compile(r"<step2>(.*?)</step2>", re.DOTALL)
_STEP3 = re.compile(r"<step3>(.*?)</step3>", re.DOTALL)


def parse_truth(truth: str) -> dict:
    """The truth dict of a record's `truth` JSON; raises naming what is missing."""
    if not truth:
        raise ValueError("no truth: this record's data set does not know what its image shows (real data)")
    parsed = json.loads(truth)
    missing = [k for k in TRUTH_KEYS if k not in parsed]
    if sum(key in parsed for key in DETAILS.values()) != 1:
        missing.append(" or ".join(DETAILS.values()))
    if missing:
        raise ValueError(f"truth {truth!r} lacks {missing}")
    return parsed


def _words(text: str) -> list[str]:
    return _WORD.findall(_TAG.sub(" ", text).lower())


def figures_named(text: str) -> list[tuple[int | None, tuple[str, ...], str]]:
    """(size class, colour words, noun) of every figure noun in `text`, reading the words
    since the previous noun: one size word gives its class, none gives medium, several give
    None (no single size)."""
    mentions, start = [], 0
    words = _words(text)
    for j, word in enumerate(words):
        if word not in _NOUNS:
            continue
        before = words[start:j]
        sizes = [_SIZE_CLASS[w] for w in before if w in _SIZE_CLASS]
        size = _MEDIUM if not sizes else sizes[0] if len(sizes) == 1 else None
        mentions.append((size, tuple(w for w in before if w in _COLOURS), word))
        start = j + 1
    return mentions


def lights_named(text: str) -> list[int]:
    """The light class of every light word (LIGHTS) in `text`, in order."""
    return [_LIGHT_CLASS[w] for w in _words(text) if w in _LIGHT_CLASS]


def image_faithful(response: str, truth: Mapping) -> bool:
    """Step 1 names the drawn figure with its colour and no other figure, with the truth's
    detail: the figure's size class, or the image's light and no other."""
    span = rewards.image_span(response)
    if not span:
        return False
    figure = ((truth["colour"],), truth["figure"].lower())
    detail, drawn = detail_of(truth)
    if detail == "light":
        return [named[1:] for named in figures_named(span)] == [figure] and lights_named(span) == [drawn]
    return figures_named(span) == [(drawn, *figure)]


def _check_labels(labels: Sequence[str]) -> None:
    unknown = [label for label in labels if label not in FEELINGS]
    if isinstance(labels, str) or not labels or unknown:
        raise ValueError(
            f"labels {labels!r}: the faithfulness vocabulary covers only {sorted(FEELINGS)} (unknown: {unknown})"
        )


def answer_coherent(response: str, labels: Sequence[str]) -> bool:
    """Step 2's feeling words and step 3's valence and arousal all belong to the boxed label."""
    _check_labels(labels)
    boxed = rewards.extract_boxed(response).lower()
    span = rewards.text_span(response)
    step2 = _STEP2.search(span)
    step3 = _STEP3.search(response)
    if boxed not in labels or step2 is None or step3 is None:
        return False
    feelings = {_FEELING_LABEL[w] for w in _words(step2.group(1)) if w in _FEELING_LABEL}
    words = set(_words(step3.group(1)))
    valence, arousal = VALENCE_AROUSAL[boxed]
    return feelings == {boxed} and words & _VALENCES == {valence} and words & _AROUSALS == {arousal}


def score(response: str, truth: Mapping, labels: Sequence[str]) -> dict[str, bool]:
    """{"image_faithful": bool, "answer_coherent": bool} of one response."""
    return {"image_faithful": image_faithful(response, truth), "answer_coherent": answer_coherent(response, labels)}


def aggregate(true_labels: Sequence[str], flags: Sequence[Mapping[str, bool]]) -> dict:
    """Rates of `score` results, overall and per true label:

    {"image_faithful": r, "answer_coherent": r, "count": n,
     "per_class": {label: {"image_faithful": r, "answer_coherent": r, "count": n}, ...}}
    """
    if len(true_labels) != len(flags):
        raise ValueError(f"aggregate: {len(true_labels)} labels but {len(flags)} scored responses")
    if not flags:
        raise ValueError("aggregate: no scored responses")

    def rates(rows: list[Mapping[str, bool]]) -> dict:
        return {k: sum(bool(r[k]) for r in rows) / len(rows) for k in KEYS} | {"count": len(rows)}

    by_label: dict[str, list] = {}
    for label, row in zip(true_labels, flags):
        by_label.setdefault(label, []).append(row)
    return rates(list(flags)) | {"per_class": {label: rates(rows) for label, rows in sorted(by_label.items())}}
