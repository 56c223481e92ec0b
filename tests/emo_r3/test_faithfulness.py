"""Tests for emor3_jax.data.faithfulness on hand-written responses, on the synthetic answers
(faithful and deliberately unfaithful), and the aggregate rates."""

import json

import pytest

from emor3_jax.data import synthetic
from emor3_jax.data.prompts import EMOSET_LABELS
from emor3_jax.data.sources import read_split
from emor3_jax.emo_r3 import faithfulness

SMALL_PINK_BALL = {"figure": "ball", "colour": "pink", "size_class": 0, "background": "yellow"}
MEDIUM_DARK_X = {"figure": "X", "colour": "dark", "size_class": 1, "background": "red"}
PINK_BALL_BY_NIGHT = {"figure": "ball", "colour": "pink", "light": 0, "background": "yellow"}


def response(step1="small pink ball", step2="fun", step3="positive, high", box="amusement"):
    return f"<step1> {step1} </step1><step2> {step2} </step2><step3> {step3} </step3> \\boxed{{{box}}}"


@pytest.mark.parametrize(
    "text, truth, faithful, coherent",
    [
        (response(), SMALL_PINK_BALL, True, True),
        # Extra words and punctuation around the figure are fine.
        (response("there is a small, pink ball here."), SMALL_PINK_BALL, True, True),
        (response("dark X", "rage", "negative, high", "anger"), MEDIUM_DARK_X, True, True),
        # Wrong size: huge, or no size word (medium), for a small ball; small for a medium X.
        (response("huge pink ball"), SMALL_PINK_BALL, False, True),
        (response("pink ball"), SMALL_PINK_BALL, False, True),
        (response("small dark X", "rage", "negative, high", "anger"), MEDIUM_DARK_X, False, True),
        (response("small huge pink ball"), SMALL_PINK_BALL, False, True),  # two sizes
        # Wrong figure, wrong colour, no colour.
        (response("small red star"), SMALL_PINK_BALL, False, True),
        (response("small dark ball"), SMALL_PINK_BALL, False, True),
        (response("small ball"), SMALL_PINK_BALL, False, True),
        # An extra figure, even the same one twice.
        (response("small pink ball and dark rain"), SMALL_PINK_BALL, False, True),
        (response("small pink ball, small pink ball"), SMALL_PINK_BALL, False, True),
        # A feeling word of another label, alone or next to a right one; no feeling word.
        (response(step2="rage"), SMALL_PINK_BALL, True, False),
        (response(step2="fun and rage"), SMALL_PINK_BALL, True, False),
        (response(step2="nice"), SMALL_PINK_BALL, True, False),
        (response(step2="silly fun laugh"), SMALL_PINK_BALL, True, True),
        # Wrong valence, wrong arousal, both arousals.
        (response(step3="negative, high"), SMALL_PINK_BALL, True, False),
        (response(step3="positive, low"), SMALL_PINK_BALL, True, False),
        (response(step3="positive, high or low"), SMALL_PINK_BALL, True, False),
        # The box decides which label the words must belong to: right words for the wrong box.
        (response(box="anger"), SMALL_PINK_BALL, True, False),
        (response(box="joy"), SMALL_PINK_BALL, True, False),
        (response().replace("\\boxed{amusement}", "amusement"), SMALL_PINK_BALL, True, False),
        # No spans: neither. Step 2 not closed: no text span; no step 3: not coherent.
        ("small pink ball, fun, positive, high \\boxed{amusement}", SMALL_PINK_BALL, False, False),
        ("<step1> small pink ball <step2> fun <step3> positive, high \\boxed{amusement}", SMALL_PINK_BALL, True, False),
        (response().replace("<step2>", "<step 2>"), SMALL_PINK_BALL, False, False),
        ("<step1> small pink ball </step1><step2> fun </step2> \\boxed{amusement}", SMALL_PINK_BALL, True, False),
        # data.synthetic_detail = light: the light, once, beside the one drawn figure; a size word is
        # neither right nor wrong there.
        (response("pink ball by night"), PINK_BALL_BY_NIGHT, True, True),
        (response("a small pink ball, at night"), PINK_BALL_BY_NIGHT, True, True),
        (response("pink ball by day"), PINK_BALL_BY_NIGHT, False, True),
        (response("pink ball"), PINK_BALL_BY_NIGHT, False, True),
        (response("pink ball by night or day"), PINK_BALL_BY_NIGHT, False, True),
        (response("pink ball by night, night"), PINK_BALL_BY_NIGHT, False, True),
        (response("dark ball by night"), PINK_BALL_BY_NIGHT, False, True),
        (response("pink ball and dark rain by night"), PINK_BALL_BY_NIGHT, False, True),
    ],
)
def test_hand_written(text, truth, faithful, coherent):
    assert faithfulness.score(text, truth, EMOSET_LABELS) == {"image_faithful": faithful, "answer_coherent": coherent}


def test_lights_named():
    assert faithfulness.lights_named("<step1> a ball by night, then by day </step1>") == [0, 1]
    assert faithfulness.lights_named("nightly daylight") == []  # whole words only


def test_figures_named():
    assert faithfulness.figures_named("<step1> a huge white mountain under dark rain </step1>") == [
        (2, ("white",), "mountain"),
        (1, ("dark",), "rain"),
    ]
    assert faithfulness.figures_named("calm scene") == []


@pytest.mark.parametrize("detail", ["size", "light"])
def test_synthetic_answers_faithful_and_unfaithful(detail):
    """The generator's faithful answers pass both; a wrong size or light fails only
    image-faithful, a feeling word of another label only answer-coherent, and both still box the
    right label."""
    records = list(read_split("synthetic", "", "", "train", EMOSET_LABELS, count=96, seed=1, image_size=56,
                              unfaithful_share=0.25, synthetic_detail=detail))  # fmt: skip
    seen = set()
    for record in records:
        truth = faithfulness.parse_truth(record["truth"])
        flags = faithfulness.score(record["answer"], truth, EMOSET_LABELS)
        wrong = truth["unfaithful"]
        seen.add(wrong)
        assert record["answer"].endswith(f"\\boxed{{{record['label']}}}")
        assert flags == {"image_faithful": wrong != detail, "answer_coherent": wrong != "feeling"}, record
    assert seen == {"", detail, "feeling"}
    assert sum(json.loads(r["truth"])["unfaithful"] != "" for r in records) == 24


def test_parse_truth_and_labels_errors():
    with pytest.raises(ValueError, match="no truth"):
        faithfulness.parse_truth("")
    with pytest.raises(ValueError, match=r"lacks \['size_class or light'\]"):
        faithfulness.parse_truth(json.dumps({"figure": "ball", "colour": "pink"}))
    with pytest.raises(ValueError, match=r"unknown: \['joy'\]"):
        faithfulness.answer_coherent(response(), ["amusement", "joy"])


def test_aggregate():
    labels = ["awe", "awe", "fear", "awe"]
    flags = [
        {"image_faithful": True, "answer_coherent": True},
        {"image_faithful": False, "answer_coherent": True},
        {"image_faithful": False, "answer_coherent": False},
        {"image_faithful": True, "answer_coherent": False},
    ]
    assert faithfulness.aggregate(labels, flags) == {
        "image_faithful": 0.5,
        "answer_coherent": 0.5,
        "count": 4,
        "per_class": {
            "awe": {"image_faithful": 2 / 3, "answer_coherent": 2 / 3, "count": 3},
            "fear": {"image_faithful": 0.0, "answer_coherent": 0.0, "count": 1},
        },
    }
    with pytest.raises(ValueError, match="3 labels but 4 scored"):
        faithfulness.aggregate(labels[:3], flags)
    with pytest.raises(ValueError, match="no scored responses"):
        faithfulness.aggregate([], [])


def test_vocabulary_is_the_generators():
    """Every answer the generator can write is faithful to what it describes."""
    for label, (colour, noun) in synthetic.FIGURES.items():
        for size_class in range(3):
            truth = {"figure": noun, "colour": colour, "size_class": size_class}
            for feeling in synthetic.FEELINGS[label]:
                answer = synthetic.reference_answer(label, "size", size_class, feeling)
                assert faithfulness.score(answer, truth, EMOSET_LABELS) == {
                    "image_faithful": True,
                    "answer_coherent": True,
                }
    for label, (colour, noun) in synthetic.FIGURES.items():
        for light in range(2):
            truth = {"figure": noun, "colour": colour, "light": light}
            for feeling in synthetic.FEELINGS[label]:
                answer = synthetic.reference_answer(label, "light", light, feeling)
                assert faithfulness.score(answer, truth, EMOSET_LABELS) == {
                    "image_faithful": True,
                    "answer_coherent": True,
                }
