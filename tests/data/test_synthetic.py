"""Tests for emor3_jax.data.synthetic: determinism, balance, splits, answer format and
length, and that the label is learnable from the pixels."""

import collections
import re

import numpy as np
import PIL.Image
import pytest

from emor3_jax.data import prompts, synthetic
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.data.tokenizers import build_test_tokenizer

# Spec section 4: the official format reward.
FORMAT = r"<step1>.*</step1>.*<step2>.*</step2>.*<step3>.*</step3>.*\\boxed\{.*\}.*"


def format_ok(response: str) -> bool:
    return re.fullmatch(FORMAT, re.sub(r"\s*(<|>|/)\s*", r"\1", response), re.DOTALL) is not None


def _pixels(example):
    return np.asarray(example["image"])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_test_tokenizer(str(tmp_path_factory.mktemp("small")))


@pytest.fixture(scope="module")
def train():
    return synthetic.SyntheticEmotions(200, seed=0)


@pytest.fixture(scope="module")
def test_split():
    return synthetic.SyntheticEmotions(100, seed=0, split="test")


def test_example_fields(train):
    ex = train[3]
    assert set(ex) == {"id", "image", "label", "problem", "answer", "valence", "arousal"}
    assert isinstance(ex["image"], PIL.Image.Image) and ex["image"].mode == "RGB" and ex["image"].size == (56, 56)
    assert ex["label"] in prompts.EMOSET_LABELS
    assert ex["problem"] == prompts.question(prompts.EMOSET_LABELS)
    assert (ex["valence"], ex["arousal"]) == prompts.VALENCE_AROUSAL[ex["label"]]
    assert ex["id"] == "synthetic-train-0-000003"
    assert synthetic.make_example(5, seed=1, size=84)["image"].size == (84, 84)


def test_deterministic():
    a, b = synthetic.make_example(17, seed=3), synthetic.make_example(17, seed=3)
    assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    np.testing.assert_array_equal(_pixels(a), _pixels(b))
    c = synthetic.make_example(17, seed=4)
    assert not np.array_equal(_pixels(a), _pixels(c))


def test_sequence_protocol(train):
    assert len(train) == 200
    np.testing.assert_array_equal(_pixels(train[-1]), _pixels(train[199]))
    with pytest.raises(IndexError):
        train[200]
    assert sum(1 for _ in synthetic.SyntheticEmotions(10, seed=0)) == 10
    with pytest.raises(ValueError, match="split='val'"):
        synthetic.SyntheticEmotions(8, seed=0, split="val")


def test_labels_balanced(train):
    counts = collections.Counter(ex["label"] for ex in train)
    assert set(counts) == set(prompts.EMOSET_LABELS) and set(counts.values()) == {25}
    # Every aligned block of 8 holds each label once, and the order differs between blocks.
    blocks = [tuple(train[i]["label"] for i in range(b, b + 8)) for b in range(0, 64, 8)]
    assert all(sorted(b) == sorted(prompts.EMOSET_LABELS) for b in blocks)
    assert len(set(blocks)) > 1


def test_train_test_differ(train, test_split):
    train_images = {_pixels(ex).tobytes() for ex in train}
    assert not any(_pixels(ex).tobytes() in train_images for ex in test_split)
    assert not {ex["id"] for ex in train} & {ex["id"] for ex in test_split}
    assert len(train_images) == len(train)  # and no two training images are equal


def test_answers_format_and_label(train):
    for ex in train:
        answer = ex["answer"]
        assert format_ok(answer), answer
        assert answer.endswith(f"\\boxed{{{ex['label']}}}")
        step3 = re.search(r"<step3>(.*)</step3>", answer).group(1).strip()
        assert step3 == f"{ex['valence']}, {ex['arousal']}"
    # A little variety within a label.
    assert len({ex["answer"] for ex in train if ex["label"] == "fear"}) >= 3


def test_answers_short(train, small):
    lengths = [len(small.encode(ex["answer"], add_special_tokens=False)) for ex in train]
    assert max(lengths) < 40, max(lengths)
    # Every answer the generator can write, not just the ones drawn above.
    for label in prompts.EMOSET_LABELS:
        for size_class in range(3):
            for choice in range(3):
                answer = synthetic.reference_answer(label, size_class, choice)
                assert format_ok(answer) and len(small.encode(answer)) < 40, answer


def test_images_process(train):
    pixel_values, grid_thw = ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)(train[0]["image"])
    assert grid_thw.tolist() == [1, 4, 4] and pixel_values.shape == (16, 1176)


def test_learnable_from_mean_colour(train, test_split):
    """Nearest class mean on the mean RGB colour: a floor on how easy the task is."""
    x = np.stack([_pixels(ex).reshape(-1, 3).mean(0) for ex in train])
    y = np.array([ex["label"] for ex in train])
    labels = list(prompts.EMOSET_LABELS)
    means = np.stack([x[y == label].mean(0) for label in labels])
    x_test = np.stack([_pixels(ex).reshape(-1, 3).mean(0) for ex in test_split])
    pred = np.array(labels)[np.argmin(((x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    accuracy = np.mean(pred == np.array([ex["label"] for ex in test_split]))
    assert accuracy > 0.9, accuracy
