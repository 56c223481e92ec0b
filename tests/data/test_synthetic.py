"""Tests for emor3_jax.data.synthetic: determinism, balance, splits, answer format and
length, and that the label is learnable from the pixels."""

import collections
import io
import json
import re

import numpy as np
import PIL.Image
import pytest

from configs.qwen_vl import get_config
from emor3_jax import config_lib
from emor3_jax.data import prompts, synthetic
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.data.sources import read_split
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
    assert set(ex) == {"id", "image", "label", "problem", "answer", "valence", "arousal", "truth"}
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
            for feeling in synthetic.FEELINGS[label]:
                answer = synthetic.reference_answer(label, "size", size_class, feeling)
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


def test_truth_matches_image_and_answer(train):
    # The figure colours of the look table, by the truth's words (hand-copied from _LOOK).
    figure_rgb = {"ball": (240, 100, 190), "mountain": (245, 245, 250), "sun": (250, 235, 140)}
    for ex in train:
        truth = ex["truth"]
        assert (truth["colour"], truth["figure"]) == synthetic.FIGURES[ex["label"]]
        assert truth["unfaithful"] == "" and truth["answer_size_class"] == truth["size_class"]
        # The radius fraction lies in its size class's range (hand-copied from SIZE_RADII).
        low, high = ((0.10, 0.13), (0.18, 0.22), (0.27, 0.31))[truth["size_class"]]
        assert low <= truth["radius"] <= high
        size = ("small ", "", "huge ")[truth["size_class"]]
        assert f"<step1> {size}{truth['colour']} {truth['figure']} </step1>" in ex["answer"]
        assert f"<step2> {truth['answer_feeling']} </step2>" in ex["answer"]
        assert truth["answer_feeling"] in synthetic.FEELINGS[ex["label"]]
        if truth["figure"] in figure_rgb:
            # A figure of radius r covers at least (r * side)^2 pixels within 45 of its colour
            # (the sun's disc is r/2: a quarter of that).
            close = np.abs(_pixels(ex).astype(int) - figure_rgb[truth["figure"]]).max(-1) < 45
            need = (truth["radius"] * 56) ** 2 / (4 if truth["figure"] == "sun" else 1)
            assert close.sum() >= need, (ex["id"], close.sum(), need)
    sizes = collections.Counter(ex["truth"]["size_class"] for ex in train)
    assert set(sizes) == {0, 1, 2} and min(sizes.values()) > 40


def _figure_pixels(example) -> int:
    """Pixels nearer the label's figure colour than its background colour (hand-copied)."""
    looks = {
        "amusement": ((235, 205, 60), (240, 100, 190)),
        "anger": ((200, 35, 35), (25, 20, 20)),
        "awe": ((40, 50, 140), (245, 245, 250)),
        "contentment": ((75, 165, 80), (250, 235, 140)),
        "disgust": ((130, 120, 40), (65, 35, 10)),
        "excitement": ((245, 135, 25), (190, 20, 60)),
        "fear": ((28, 22, 40), (225, 225, 200)),
        "sadness": ((115, 130, 150), (30, 40, 100)),
    }
    background, figure = looks[example["label"]]
    p = _pixels(example).astype(np.float64)
    return int((((p - figure) ** 2).sum(-1) < ((p - background) ** 2).sum(-1)).sum())


def test_size_class_visible_in_pixels(train, test_split):
    """The image judge must read the size class from 56 pixels: a count of figure pixels,
    with per-figure cuts between the training classes' medians (geometric mean), names it
    for >= 98% of the test images of every figure."""
    counts = collections.defaultdict(list)
    for ex in train:
        counts[ex["label"], ex["truth"]["size_class"]].append(_figure_pixels(ex))
    right = collections.defaultdict(list)
    for ex in test_split:
        medians = [np.median(counts[ex["label"], c]) for c in range(3)]
        cuts = [np.sqrt(medians[c] * medians[c + 1]) for c in range(2)]
        right[ex["label"]].append(int(np.searchsorted(cuts, _figure_pixels(ex))) == ex["truth"]["size_class"])
    rates = {label: np.mean(r) for label, r in right.items()}
    assert min(rates.values()) >= 0.98, rates


@pytest.mark.parametrize("share, n, count", [(0.25, 512, {128}), (0.3, 104, {31, 32}), (0.1, 80, {8}), (1.0, 16, {16})])
def test_unfaithful_share(share, n, count):
    for seed in (0, 1):
        unfaithful = [synthetic.is_unfaithful(i, seed, "train", share) for i in range(n)]
        assert sum(unfaithful) in count
        # Every block of 8 holds floor or ceil of 8 * share: 2 for 0.25, 2 or 3 for 0.3.
        per_block = {sum(unfaithful[b : b + 8]) for b in range(0, n, 8)}
        assert per_block <= {int(np.floor(8 * share)), int(np.ceil(8 * share))}


def test_unfaithful_answers_keep_label_and_image():
    faithful = synthetic.SyntheticEmotions(64, seed=2)
    mixed = synthetic.SyntheticEmotions(64, seed=2, unfaithful_share=0.25)
    kinds = collections.Counter()
    for a, b in zip(faithful, mixed):
        np.testing.assert_array_equal(_pixels(a), _pixels(b))  # the wrong detail is in the text only
        assert b["label"] == a["label"] and b["answer"].endswith(f"\\boxed{{{a['label']}}}") and format_ok(b["answer"])
        wrong = b["truth"]["unfaithful"]
        kinds[wrong] += 1
        if not wrong:
            assert b["answer"] == a["answer"] and b["truth"] == a["truth"]
            continue
        assert b["answer"] != a["answer"]
        if wrong == "size":
            assert b["truth"]["answer_size_class"] != a["truth"]["size_class"]
            assert b["truth"]["answer_feeling"] == a["truth"]["answer_feeling"]
        else:
            assert b["truth"]["answer_feeling"] not in synthetic.FEELINGS[a["label"]]
            assert b["truth"]["answer_size_class"] == a["truth"]["size_class"]
    assert kinds[""] == 48 and kinds["size"] > 0 and kinds["feeling"] > 0
    # Deterministic given the seed; another seed picks other examples.
    again = [ex["answer"] for ex in synthetic.SyntheticEmotions(64, seed=2, unfaithful_share=0.25)]
    assert again == [ex["answer"] for ex in mixed]
    picks = [synthetic.is_unfaithful(i, 2, "train", 0.25) for i in range(64)]
    assert picks != [synthetic.is_unfaithful(i, 5, "train", 0.25) for i in range(64)]
    with pytest.raises(ValueError, match="unfaithful_share=1.5 must be in"):
        synthetic.SyntheticEmotions(8, seed=0, unfaithful_share=1.5)


def test_feeling_words_name_one_label():
    words = [w for ws in synthetic.FEELINGS.values() for w in ws]
    assert len(words) == len(set(words))
    assert set(synthetic.FEELINGS) == set(synthetic.FIGURES) == set(prompts.EMOSET_LABELS)


def test_to_record_carries_truth_as_json():
    ex = synthetic.make_example(3, seed=0, unfaithful_share=1.0)
    record = synthetic.to_record(ex)
    assert set(record) == {"id", "image", "label", "problem", "answer", "truth"}
    assert json.loads(record["truth"]) == ex["truth"] and ex["truth"]["unfaithful"] in ("size", "feeling")
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(record["image"]))), _pixels(ex))


def test_config_unfaithful_share(tmp_path):
    c = get_config("tiny")
    assert c.data.unfaithful_share == 0.25 and get_config("3b").data.unfaithful_share == 0.0
    records = read_split(
        "synthetic", "", "", "train", c.data.labels, count=c.data.synthetic_train, seed=c.seed,
        image_size=c.data.image_size, unfaithful_share=c.data.unfaithful_share,
    )  # fmt: skip
    wrong = [json.loads(r["truth"])["unfaithful"] for r in records]
    assert len(wrong) == 512 and sum(w != "" for w in wrong) == 128  # 0.25 * 512, exactly
    c.workdir = str(tmp_path)
    config_lib.validate(c)
    for bad in (-0.1, 1.5):
        c.data.unfaithful_share = bad
        with pytest.raises(ValueError, match=f"data.unfaithful_share={bad} must be in"):
            config_lib.validate(c)


def test_web_photo_sizes_cover_the_range_within_the_aspect_bounds():
    shapes = np.array([synthetic.image_shape(i, 0, "train", (200, 2000)) for i in range(400)])
    assert shapes.min() >= 200 and shapes.max() <= 2000
    ratio = shapes[:, 0] / shapes[:, 1]
    assert ratio.min() >= 1 / 3 and ratio.max() <= 3
    # the whole range is drawn: small and large sides, tall and wide images
    assert shapes.min() < 250 and shapes.max() > 1800 and ratio.min() < 0.4 and ratio.max() > 2.5
    assert synthetic.image_shape(7, 0, "train", (300, 300)) == (300, 300)  # a narrow range holds what it can
    with pytest.raises(ValueError, match=r"sides=\(20, 100\)"):
        synthetic.image_shape(0, 0, "train", (20, 100))


def test_web_photo_sizes_change_the_canvas_only():
    square = synthetic.make_example(5, seed=0, unfaithful_share=0.5)
    web = synthetic.make_example(5, seed=0, unfaithful_share=0.5, sides=(200, 2000))
    assert web["image"].size == synthetic.image_shape(5, 0, "train", (200, 2000)) != square["image"].size
    assert {k: v for k, v in web.items() if k != "image"} == {k: v for k, v in square.items() if k != "image"}
    # the label's background colour still dominates the picture
    pixels = np.asarray(web["image"], np.float64).reshape(-1, 3).mean(0)
    background = np.array(synthetic._LOOK[web["label"]][0], np.float64)
    assert np.abs(pixels - background).max() < 40


def test_config_image_sides_reach_the_records():
    c = get_config("tiny")
    c.data.image_sides = (100, 300)
    records = list(
        read_split(
            "synthetic",
            "",
            "",
            "train",
            prompts.EMOSET_LABELS,
            count=3,
            seed=0,
            image_size=56,
            image_sides=c.data.image_sides,
        )
    )
    sizes = [PIL.Image.open(io.BytesIO(r["image"])).size for r in records]
    assert sizes == [synthetic.image_shape(i, 0, "train", (100, 300)) for i in range(3)]
    c.data.image_sides = (10, 300)
    c.workdir = "/tmp/unused"
    with pytest.raises(ValueError, match=r"data.image_sides=\(10, 300\) must be \(\) or \(min, max\)"):
        config_lib.validate(c)


# --- data.synthetic_detail = "light": step 1 names the image's light instead of the size ---


@pytest.fixture(scope="module")
def lit():
    return synthetic.SyntheticEmotions(200, seed=0, detail="light")


def test_light_is_the_size_data_lit_and_named(train, lit):
    """Light changes the pixels by its shift (hand-copied: -40 by night, +40 by day) and step 1;
    labels, figures, sizes and feelings stay those of the size data."""
    for a, b in zip(train, lit):
        assert (b["id"], b["label"], b["problem"]) == (a["id"], a["label"], a["problem"])
        ta, tb = a["truth"], b["truth"]
        assert "size_class" not in tb and tb["light"] == tb["answer_light"] in (0, 1)
        assert {k: tb[k] for k in ("figure", "colour", "radius", "background", "answer_feeling")} == {
            k: ta[k] for k in ("figure", "colour", "radius", "background", "answer_feeling")
        }
        light = ("night", "day")[tb["light"]]
        assert f"<step1> {tb['colour']} {tb['figure']} by {light} </step1>" in b["answer"]
        assert b["answer"].split("</step1>")[1] == a["answer"].split("</step1>")[1]
        pa, pb = _pixels(a).astype(int), _pixels(b).astype(int)
        inside = (pa >= 45) & (pa <= 210)  # neither side clipped (the noise rounds within 1)
        assert inside.any() and np.abs(pb - pa - (-40, 40)[tb["light"]])[inside].max() <= 1, b["id"]
    lights = collections.Counter((ex["label"], ex["truth"]["light"]) for ex in lit)
    assert len(lights) == 16 and min(collections.Counter(light for _, light in lights.elements()).values()) > 80


def test_light_answers_short(small):
    """Every light answer is at most 40 tokens: the tiny job samples up to rl.max_response_len = 48."""
    for label in prompts.EMOSET_LABELS:
        for light in range(2):
            for feeling in synthetic.FEELINGS[label]:
                answer = synthetic.reference_answer(label, "light", light, feeling)
                assert format_ok(answer) and len(small.encode(answer)) <= 40, answer


def test_light_visible_in_pixels_and_the_label_still_learnable(lit):
    """The mean grey level, cut per label halfway between the training classes' medians, names the
    light of >= 98% of every label's test images; the nearest (label, light) mean colour names the
    label of > 90%."""
    test = synthetic.SyntheticEmotions(100, seed=0, split="test", detail="light")
    grey, colour = collections.defaultdict(list), collections.defaultdict(list)
    for ex in lit:
        grey[ex["label"], ex["truth"]["light"]].append(_pixels(ex).mean())
        colour[ex["label"], ex["truth"]["light"]].append(_pixels(ex).reshape(-1, 3).mean(0))
    right = collections.defaultdict(list)
    cells = sorted(colour)
    means = np.stack([np.mean(colour[cell], 0) for cell in cells])
    labelled = []
    for ex in test:
        cut = (np.median(grey[ex["label"], 0]) + np.median(grey[ex["label"], 1])) / 2
        right[ex["label"]].append(int(_pixels(ex).mean() > cut) == ex["truth"]["light"])
        nearest = np.argmin(((_pixels(ex).reshape(-1, 3).mean(0) - means) ** 2).sum(-1))
        labelled.append(cells[nearest][0] == ex["label"])
    rates = {label: np.mean(r) for label, r in right.items()}
    assert min(rates.values()) >= 0.98, rates
    assert np.mean(labelled) > 0.9, np.mean(labelled)


def test_light_unfaithful_answers_name_the_other_light():
    clean = synthetic.SyntheticEmotions(64, seed=2, detail="light")
    mixed = synthetic.SyntheticEmotions(64, seed=2, unfaithful_share=0.25, detail="light")
    kinds = collections.Counter(ex["truth"]["unfaithful"] for ex in mixed)
    assert set(kinds) == {"", "light", "feeling"} and kinds[""] == 48
    for a, b in zip(clean, mixed):
        np.testing.assert_array_equal(_pixels(a), _pixels(b))
        if b["truth"]["unfaithful"] == "light":
            assert (
                b["truth"]["answer_light"] == 1 - a["truth"]["light"]
                and "by " + ("night", "day")[b["truth"]["answer_light"]] in b["answer"]
            )


def test_synthetic_detail_reaches_the_records_and_is_checked(tmp_path):
    records = read_split("synthetic", "", "", "test", prompts.EMOSET_LABELS, count=3, seed=0, image_size=56,
                         synthetic_detail="light")  # fmt: skip
    assert all("light" in json.loads(r["truth"]) for r in records)
    with pytest.raises(ValueError, match="only the synthetic source draws a detail"):
        read_split("folder", str(tmp_path), str(tmp_path / "a.jsonl"), "test", prompts.EMOSET_LABELS, count=0,
                   seed=0, image_size=56, synthetic_detail="light")  # fmt: skip
    with pytest.raises(ValueError, match=r"detail='shadow', expected one of \['size', 'light'\]"):
        synthetic.make_example(0, seed=0, detail="shadow")
    c = get_config("tiny")
    c.workdir = str(tmp_path)
    c.data.synthetic_detail = "shadow"
    with pytest.raises(ValueError, match=r"data.synthetic_detail='shadow' must be one of \('size', 'light'\)"):
        config_lib.validate(c)
