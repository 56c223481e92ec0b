"""Tests for emor3_jax.data.reflection_examples: the exact prompts and targets, the balance of
yes/no and of the wrong details, determinism, the held-out set and the judge's accuracy."""

import collections
import json

import pytest

from emor3_jax.data import synthetic
from emor3_jax.data.prompts import EMOSET_LABELS
from emor3_jax.data.sources import read_split
from emor3_jax.emo_r3 import faithfulness, reflection_examples, rewards
from emor3_jax.emo_r3.reflection_examples import ReflectionExample

LABELS = list(EMOSET_LABELS)
TEXT_QUESTION = (
    "\nWhich emotion best describes the text above?\nAnswer the question using one emotional category "
    "(one word only): amusement, anger, awe, contentment, disgust, excitement, fear, sadness."
)
IMAGE_QUESTION = "<image>\nCan the following text describe the image?Please answer with yes or no."


def record(truth: dict, label="amusement", rid="r0"):
    return {"id": rid, "image": b"png bytes", "label": label, "truth": json.dumps(truth)}


@pytest.fixture(scope="module")
def train():
    return list(read_split("synthetic", "", "", "train", LABELS, count=24, seed=0, image_size=56))


def test_four_examples_of_one_record_written_out():
    truth = {"figure": "ball", "colour": "pink", "size_class": 0}
    text, text_feeling, image_true, image_wrong = reflection_examples.reflection_examples([record(truth)], LABELS, 0)

    feeling = text.prompt.split("<step2> ")[1].split(" </step2>")[0]
    assert feeling in ("fun", "silly", "laugh")
    assert text == ReflectionExample(
        f"<step1> small pink ball </step1><step2> {feeling} </step2>" + TEXT_QUESTION,
        "amusement",
        False,
        b"",
        "text",
        "r0",
    )
    other = text_feeling.target
    assert other in LABELS and other != "amusement"
    other_feeling = text_feeling.prompt.split("<step2> ")[1].split(" </step2>")[0]
    assert other_feeling in synthetic.FEELINGS[other]
    assert text_feeling.prompt == f"<step1> small pink ball </step1><step2> {other_feeling} </step2>" + TEXT_QUESTION
    assert (text_feeling.uses_image, text_feeling.kind) == (False, "text_feeling")

    assert image_true == ReflectionExample(
        IMAGE_QUESTION + "<step1> small pink ball </step1>", "yes", True, b"png bytes", "image_true", "r0"
    )
    # Record 0 gets the first wrong detail: another figure, same size.
    assert image_wrong.kind == "image_wrong_figure" and image_wrong.target == "no" and image_wrong.uses_image
    step1 = image_wrong.prompt.removeprefix(IMAGE_QUESTION)
    assert step1.startswith("<step1> small ") and "ball" not in step1 and step1.endswith(" </step1>")


def test_prompts_are_the_judges_at_train_time(train):
    """A policy that writes its cold-start answer gets asked these very image questions."""
    examples = reflection_examples.reflection_examples(train, LABELS, 0)
    for rec, ex in zip(train, examples[2::4]):
        for compat in rewards.COMPATS:
            assert ex.prompt == rewards.image_reflection_prompt(rec["answer"], compat)
            assert ex.image == rec["image"]
    for ex in examples[0::4]:
        answer = ex.prompt.removesuffix(TEXT_QUESTION) + "<step3> x </step3> \\boxed{awe}"
        for compat in rewards.COMPATS:
            assert ex.prompt == rewards.text_reflection_prompt(answer, LABELS, compat)


def test_balanced_and_wrong_details_are_wrong(train):
    examples = reflection_examples.reflection_examples(train, LABELS, 0)
    assert len(examples) == 4 * 24
    kinds = collections.Counter(ex.kind for ex in examples)
    assert kinds == {
        "text": 24,
        "text_feeling": 24,
        "image_true": 24,
        **dict.fromkeys(("image_wrong_figure", "image_wrong_size", "image_wrong_colour"), 8),
    }
    image = [ex for ex in examples if ex.uses_image]
    assert collections.Counter(ex.target for ex in image) == {"yes": 24, "no": 24}
    # Labels of the text questions: each label 3 times (24 balanced records).
    assert set(collections.Counter(ex.target for ex in examples if ex.kind == "text").values()) == {3}

    for rec, ex in zip(train, examples[3::4]):
        truth = faithfulness.parse_truth(rec["truth"])
        [(size, colours, noun)] = faithfulness.figures_named(ex.prompt)
        drawn = (truth["size_class"], (truth["colour"],), truth["figure"].lower())
        assert faithfulness.image_faithful(ex.prompt + "<step2>", truth) is False
        if ex.kind == "image_wrong_figure":
            assert noun != drawn[2] and size == drawn[0]
        elif ex.kind == "image_wrong_size":
            assert (colours, noun) == drawn[1:] and size != drawn[0]
        else:
            assert noun == drawn[2] and size == drawn[0] and colours != drawn[1]
    for rec, ex in zip(train, examples[2::4]):
        assert faithfulness.image_faithful(ex.prompt + "<step2>", json.loads(rec["truth"]))  # step 1 as a span
    for rec, ex in zip(train, examples[1::4]):
        feeling = ex.prompt.split("<step2> ")[1].split(" </step2>")[0]
        assert ex.target != rec["label"] and feeling in synthetic.FEELINGS[ex.target]


def test_deterministic_given_seed(train):
    a = reflection_examples.reflection_examples(train, LABELS, 0)
    assert a == reflection_examples.reflection_examples(train, LABELS, 0)
    assert a != reflection_examples.reflection_examples(train, LABELS, 1)


def test_held_out_examples_are_other_images(train):
    held = reflection_examples.held_out_examples(8, seed=0, image_size=56, labels=LABELS, detail="size")
    assert len(held) == 32
    assert all(ex.record_id.startswith("synthetic-test-0-") for ex in held)
    assert not {ex.image for ex in held if ex.uses_image} & {r["image"] for r in train}


def test_judge_accuracy():
    def ex(kind, target):
        return ReflectionExample("q", target, kind.startswith("image"), b"", kind, "r")

    examples = [
        ex("text", "awe"),
        ex("text", "fear"),
        ex("text_feeling", "anger"),
        ex("image_true", "yes"),
        ex("image_wrong_size", "no"),
        ex("image_wrong_colour", "no"),
    ]
    # Right: "Awe." (robust coherence strips), "Yes", "No, it cannot." (first yes/no word).
    # Wrong: "fear, awe, anger, sadness or joy" (six words: too long to pick the target from),
    # "None" (0.5), "maybe" (neither yes nor no).
    answers = ["Awe.", "fear, awe, anger, sadness or joy", "None", "Yes", "No, it cannot.", "maybe"]
    assert reflection_examples.judge_accuracy(examples, answers) == {
        "overall": 3 / 6,
        "text": 1 / 3,
        "image": 2 / 3,
        "count": 6,
        "per_kind": {
            "image_true": 1.0,
            "image_wrong_colour": 0.0,
            "image_wrong_size": 1.0,
            "text": 0.5,
            "text_feeling": 0.0,
        },
    }
    with pytest.raises(ValueError, match="6 examples but 5 answers"):
        reflection_examples.judge_accuracy(examples, answers[:5])


def test_errors():
    truth = {"figure": "ball", "colour": "pink", "size_class": 0}
    with pytest.raises(ValueError, match=r"unknown: \['joy'\]"):
        reflection_examples.reflection_examples([record(truth)], ["amusement", "joy"], 0)
    with pytest.raises(ValueError, match="no truth"):
        reflection_examples.reflection_examples([{**record(truth), "truth": ""}], LABELS, 0)
    with pytest.raises(ValueError, match="label 'awe' is not one of"):
        reflection_examples.reflection_examples([record(truth, label="awe")], ["amusement", "anger"], 0)
    with pytest.raises(ValueError, match="kind 'image_true' is not one of"):
        reflection_examples.wrong_description(truth, "image_true", None)


def test_light_records_ask_about_the_light():
    """With data.synthetic_detail = light, step 1 names the light, and the wrong details are, in
    turn, the figure (same light), the light, the colour and the light again."""
    truth = {"figure": "ball", "colour": "pink", "light": 0}
    text, _, image_true, image_wrong = reflection_examples.reflection_examples([record(truth)], LABELS, 0)
    assert text.prompt.startswith("<step1> pink ball by night </step1><step2> ")
    assert image_true.prompt == IMAGE_QUESTION + "<step1> pink ball by night </step1>"
    assert image_wrong.kind == "image_wrong_figure" and image_wrong.prompt.endswith(" by night </step1>")
    assert "ball" not in image_wrong.prompt

    lit = list(read_split("synthetic", "", "", "train", LABELS, count=24, seed=0, image_size=56,
                          synthetic_detail="light"))  # fmt: skip
    examples = reflection_examples.reflection_examples(lit, LABELS, 0)
    kinds = collections.Counter(ex.kind for ex in examples)
    assert kinds == {"text": 24, "text_feeling": 24, "image_true": 24,
                     "image_wrong_figure": 6, "image_wrong_light": 12, "image_wrong_colour": 6}  # fmt: skip
    for rec, ex in zip(lit, examples[3::4]):
        truth = faithfulness.parse_truth(rec["truth"])
        [(_, colours, noun)] = faithfulness.figures_named(ex.prompt)
        [light] = faithfulness.lights_named(ex.prompt)
        assert faithfulness.image_faithful(ex.prompt + "<step2>", truth) is False
        if ex.kind == "image_wrong_figure":
            assert noun != truth["figure"].lower() and light == truth["light"]
        elif ex.kind == "image_wrong_light":
            assert (colours, noun) == ((truth["colour"],), truth["figure"].lower()) and light != truth["light"]
        else:
            assert noun == truth["figure"].lower() and light == truth["light"] and colours != (truth["colour"],)
    for rec, ex in zip(lit, examples[2::4]):
        assert faithfulness.image_faithful(ex.prompt + "<step2>", json.loads(rec["truth"]))
    held_out = reflection_examples.held_out_examples(8, 0, 56, LABELS, "light")
    assert {ex.kind for ex in held_out} >= {"image_wrong_light"} and " by " in held_out[2].prompt
