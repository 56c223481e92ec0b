"""A synthetic emotion data set, shipped as code, for tests and CPU smoke runs.

Each of the 8 EmoSet labels has its own background colour and its own figure (shape and
colour): amusement a pink ball on yellow, anger a dark X on red, awe a white mountain
on navy, contentment a warm sun on green, disgust dark brown dots on olive, excitement a
red star on orange, fear pale eyes on near-black, sadness dark rain on grey-blue. Shades,
figure size (within its size class, SIZE_RADII) and position are jittered and mild noise is
added, so examples differ but the label stays a simple function of the pixels (the mean
colour alone separates the classes).

Step 1 names the figure and one DETAIL of the image that the label does not decide
(`detail`, --config.data.synthetic_detail):
  size   its size class ("small pink ball", "pink ball", "huge pink ball"): the default. The
         tiny model does not learn to see it, neither as policy nor as judge (docs/results.md,
         "Where the size is lost").
  light  the image is lit by day or by night (LIGHTS), drawn apart from the label: every pixel
         shifted by LIGHT_SHIFT grey levels ("pink ball by night"). The tiny model sees it, after
         a longer cold start (docs/results.md, "A detail the tiny model sees"): the learning
         benchmark's setting.

The reference answers follow the SET format in a few words each, short enough for the
~1000-token test tokenizer (at most 40 tokens): step 1 names the figure and its detail, step 2
one feeling word of the label, step 3 valence and arousal as "positive, high" (the word
"arousal" alone costs 5 tokens). FIGURES, SIZE_WORDS, LIGHTS, FEELINGS and
prompts.VALENCE_AROUSAL are the one vocabulary that the answers, the faithfulness metrics and
the reflection examples share.

Every example knows its TRUTH (`truth`, a dict; JSON in the record): what is drawn and what
its answer says. A share `unfaithful_share` of the answers carries one wrong detail (the wrong
size class or light, or a feeling word of another label) while still boxing the right label, as
imperfect distilled cold-start data would; the truth marks which.

Everything is a function of (index, seed, split, unfaithful_share, detail): no files, no
downloads.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw

from emor3_jax.data.prompts import EMOSET_LABELS, VALENCE_AROUSAL, question

SPLITS = {"train": 0, "test": 1}
# Independent random streams: adding the unfaithful draws leaves labels and images unchanged.
(
    _LABEL_STREAM,
    _IMAGE_STREAM,
    _UNFAITHFUL_STREAM,
    _SHARE_OFFSET_STREAM,
    _SHARE_ORDER_STREAM,
    _SIDES_STREAM,
    _LIGHT_STREAM,
) = range(7)
# Web-photo shapes (`sides`): width / height between 1:3 and 3:1.
MAX_ASPECT = 3.0

# label -> (background RGB, figure RGB, figure kind drawn by _draw)
_LOOK = {
    "amusement": ((235, 205, 60), (240, 100, 190), "ball"),
    "anger": ((200, 35, 35), (25, 20, 20), "cross"),
    "awe": ((40, 50, 140), (245, 245, 250), "mountain"),
    "contentment": ((75, 165, 80), (250, 235, 140), "sun"),
    "disgust": ((130, 120, 40), (65, 35, 10), "dots"),
    "excitement": ((245, 135, 25), (190, 20, 60), "star"),
    "fear": ((28, 22, 40), (225, 225, 200), "eyes"),
    "sadness": ((115, 130, 150), (30, 40, 100), "rain"),
}
# label -> (colour word, noun): how step 1 names the label's figure.
FIGURES = {
    "amusement": ("pink", "ball"),
    "anger": ("dark", "X"),
    "awe": ("white", "mountain"),
    "contentment": ("warm", "sun"),
    "disgust": ("brown", "dots"),
    "excitement": ("red", "star"),
    "fear": ("pale", "eyes"),
    "sadness": ("dark", "rain"),
}
# label -> how the background is named in the truth.
BACKGROUNDS = {
    "amusement": "yellow",
    "anger": "red",
    "awe": "navy",
    "contentment": "green",
    "disgust": "olive",
    "excitement": "orange",
    "fear": "black",
    "sadness": "grey",
}
# What step 1 names beside the figure (see the module's docstring) -> the truth's key for it.
DETAILS = {"size": "size_class", "light": "light"}
# Size class -> the word before the figure: small, medium (no word), large.
SIZE_WORDS = ("small", "", "huge")
# Light class -> the last of the step-1 words ("pink ball by night") and the grey levels added to
# every pixel. The gap (80) is wider than the background's jitter (+-18 per channel, +-10 in
# common), so each label's day and night images are apart in mean brightness.
LIGHTS = ("night", "day")
LIGHT_SHIFT = (-40.0, 40.0)
# detail -> the words of its classes
DETAIL_WORDS = {"size": SIZE_WORDS, "light": LIGHTS}
# label -> the step-2 words: how a viewer would feel. No word belongs to two labels.
FEELINGS = {
    "amusement": ("fun", "silly", "laugh"),
    "anger": ("rage", "anger"),
    "awe": ("wonder", "awe"),
    "contentment": ("peace", "calm", "relaxed"),
    "disgust": ("sick", "disgust", "dirt"),
    "excitement": ("energy", "cheer", "jump"),
    "fear": ("threat", "horror", "fear"),
    "sadness": ("grief", "sorrow", "alone"),
}
# The wrong details of unfaithful answers: the image's detail (named as in DETAILS) or the feeling.
UNFAITHFUL_KINDS = ("detail", "feeling")
# Size class -> range of the figure radius as a fraction of the image side. The gaps between
# the ranges keep the classes apart in pixels (the figure's area grows with radius^2: a
# pixel count names the class of nearly every image, tests/data/test_synthetic.py); contiguous
# ranges left 15% of the 56-pixel images ambiguous, so no judge could learn to read the size.
SIZE_RADII = ((0.10, 0.13), (0.18, 0.22), (0.27, 0.31))


def describe(colour: str, noun: str, detail: str, k: int) -> str:
    """Step-1 words for a figure with class `k` of `detail`: "small pink ball", "pink ball"
    (medium), "huge pink ball"; "pink ball by night", "pink ball by day"."""
    if detail == "size":
        return " ".join(w for w in (SIZE_WORDS[k], colour, noun) if w)
    if detail == "light":
        return f"{colour} {noun} by {LIGHTS[k]}"
    raise ValueError(f"synthetic: detail={detail!r}, expected one of {list(DETAILS)}")


def detail_of(truth: dict) -> tuple[str, int]:
    """(detail, class) of a truth dict (see `_truth`): the one DETAILS key it holds."""
    held = [(detail, truth[key]) for detail, key in DETAILS.items() if key in truth]
    if len(held) != 1:
        raise ValueError(f"truth {truth!r}: expected exactly one of {list(DETAILS.values())}")
    return held[0]


def set_answer(step1: str, feeling: str, label: str) -> str:
    """A SET response: `step1` and `feeling` as steps 1 and 2, the valence and arousal of
    `label` as step 3, `label` boxed."""
    valence, arousal = VALENCE_AROUSAL[label]
    return f"<step1> {step1} </step1><step2> {feeling} </step2><step3> {valence}, {arousal} </step3> \\boxed{{{label}}}"


def reference_answer(label: str, detail: str, k: int, feeling: str) -> str:
    """The SET-formatted answer for the figure of `label` with class `k` of `detail`, feeling
    `feeling`."""
    return set_answer(describe(*FIGURES[label], detail, k), feeling, label)


def label_of(index: int, seed: int, split: str = "train") -> str:
    """Label of example `index`: each block of 8 consecutive indices holds every label once,
    in an order drawn from (seed, split, index // 8)."""
    order = _rng(seed, split, _LABEL_STREAM, index // len(EMOSET_LABELS)).permutation(len(EMOSET_LABELS))
    return EMOSET_LABELS[order[index % len(EMOSET_LABELS)]]


def is_unfaithful(index: int, seed: int, split: str, share: float) -> bool:
    """Whether example `index` carries a wrong detail.

    Virtual index v is picked when floor((v + 1) * share + o) > floor(v * share + o), o
    uniform in [0, 1) drawn from (seed, split): any n consecutive v hold floor(n * share) or
    ceil(n * share) picks. Within each aligned block of 8 examples (the label blocks of
    `label_of`) the v are a permutation drawn from (seed, split, block), so the picks fall on
    random positions and the first 8k examples hold floor or ceil of share * 8k of them.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"synthetic: unfaithful_share={share} must be in [0, 1]")
    if share == 0.0:
        return False
    block, position = divmod(index, len(EMOSET_LABELS))
    order = _rng(seed, split, _SHARE_ORDER_STREAM, block).permutation(len(EMOSET_LABELS))
    v = block * len(EMOSET_LABELS) + int(order[position])
    offset = _rng(seed, split, _SHARE_OFFSET_STREAM, 0).uniform()
    return math.floor((v + 1) * share + offset) > math.floor(v * share + offset)


def image_shape(index: int, seed: int, split: str, sides: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of example `index` with web-photo sizes: both sides in [sides[0],
    sides[1]], the aspect ratio log-uniform in [1/MAX_ASPECT, MAX_ASPECT], the long side
    log-uniform over what that ratio allows. Its own stream: labels and figures do not move."""
    low, high = sides
    if not 28 <= low <= high:
        raise ValueError(f"synthetic: sides={tuple(sides)} must be (min, max) with 28 <= min <= max")
    rng = _rng(seed, split, _SIDES_STREAM, index)
    ratio = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    ratio = min(max(ratio, low / high), high / low)  # a narrow range cannot hold 1:3
    stretch = max(ratio, 1 / ratio)
    # floor and ceil keep both sides in range and the ratio within `stretch` (max: exp(log(low))
    # may fall a hair below low)
    long_side = max(low, math.floor(math.exp(rng.uniform(math.log(low * stretch), math.log(high)))))
    short_side = max(low, math.ceil(long_side / stretch))
    return (long_side, short_side) if ratio >= 1 else (short_side, long_side)


def make_example(
    index: int,
    seed: int,
    size: int = 56,
    split: str = "train",
    unfaithful_share: float = 0.0,
    sides: tuple[int, int] | None = None,
    detail: str = "size",
) -> dict:
    """Example `index` of the (seed, split) stream: id, image (RGB, size x size; with `sides`
    = (min, max), web-photo sizes: `image_shape`), label, problem, answer, valence, arousal,
    truth (a dict, see `_truth`). With `unfaithful_share` > 0 the answers of the examples
    `is_unfaithful` picks carry one wrong detail; the image, the label and every other answer
    stay as they are without it. `sides` changes the canvas only: label, figure, size class
    and answer are those of the square image. `detail` (DETAILS) is what step 1 names beside
    the figure; "light" also lights the image, from its own stream (the figures, labels and
    sizes are those of "size")."""
    if size < 28:
        raise ValueError(f"make_example: size={size} is below the 28-pixel minimum")
    if detail not in DETAILS:
        raise ValueError(f"make_example: detail={detail!r}, expected one of {list(DETAILS)}")
    width, height = image_shape(index, seed, split, sides) if sides else (size, size)
    label = label_of(index, seed, split)
    rng = _rng(seed, split, _IMAGE_STREAM, index)
    background, figure, kind = _LOOK[label]

    # Background: jittered shade, a mild vertical gradient, noise added at the end.
    shade = np.array(background, np.float64) + rng.uniform(-18, 18, 3) + rng.uniform(-10, 10)
    ramp = np.linspace(-1, 1, height)[:, None, None] * rng.uniform(-12, 12)
    canvas = np.broadcast_to(shade + ramp, (height, width, 3))
    image = PIL.Image.fromarray(_to_uint8(canvas))

    size_class = int(rng.integers(len(SIZE_RADII)))
    fraction = rng.uniform(*SIZE_RADII[size_class])
    radius = fraction * min(width, height)
    margin = radius + 2
    cx, cy = rng.uniform((margin, margin), (width - margin, height - margin))
    colour = tuple(int(c) for c in np.clip(np.array(figure) + rng.uniform(-15, 15, 3), 0, 255))
    _draw(PIL.ImageDraw.Draw(image), kind, cx, cy, radius, colour, rng)

    pixels = np.asarray(image, np.float64) + rng.normal(0, 6, (height, width, 3))
    feeling = FEELINGS[label][int(rng.integers(len(FEELINGS[label])))]
    if detail == "size":
        drawn = size_class
    else:
        drawn = int(_rng(seed, split, _LIGHT_STREAM, index).integers(len(LIGHTS)))
        pixels += LIGHT_SHIFT[drawn]

    wrong, said, said_feeling = "", drawn, feeling
    if is_unfaithful(index, seed, split, unfaithful_share):
        wrong_rng = _rng(seed, split, _UNFAITHFUL_STREAM, index)
        wrong = UNFAITHFUL_KINDS[int(wrong_rng.integers(len(UNFAITHFUL_KINDS)))]
        if wrong == "detail":
            wrong = detail
            said = int(wrong_rng.choice([c for c in range(len(DETAIL_WORDS[detail])) if c != drawn]))
        else:
            other = str(wrong_rng.choice([x for x in EMOSET_LABELS if x != label]))
            said_feeling = str(wrong_rng.choice(FEELINGS[other]))
    valence, arousal = VALENCE_AROUSAL[label]
    return {
        "id": f"synthetic-{split}-{seed}-{index:06d}",
        "image": PIL.Image.fromarray(_to_uint8(pixels)),
        "label": label,
        "problem": question(EMOSET_LABELS),
        "answer": reference_answer(label, detail, said, said_feeling),
        "valence": valence,
        "arousal": arousal,
        "truth": _truth(label, fraction, detail, drawn, said, said_feeling, wrong),
    }


def _truth(label: str, fraction: float, detail: str, drawn: int, said: int, said_feeling: str, wrong: str) -> dict:
    """What is drawn (figure noun, colour word, the class of the detail under its DETAILS key:
    size_class or light, radius as a fraction of the side, background) and what the answer
    says (answer_size_class or answer_light, answer_feeling); `unfaithful` names the wrong
    detail of the answer ("size", "light" or "feeling"), "" when it is right."""
    colour, noun = FIGURES[label]
    key = DETAILS[detail]
    return {
        "figure": noun,
        "colour": colour,
        key: drawn,
        "radius": float(fraction),
        "background": BACKGROUNDS[label],
        f"answer_{key}": said,
        "answer_feeling": said_feeling,
        "unfaithful": wrong,
    }


def to_record(example: dict) -> dict:
    """A RECORD (see data/sources) of `example`: the image as PNG bytes, the truth as JSON."""
    buf = io.BytesIO()
    example["image"].save(buf, format="PNG")
    record = {k: example[k] for k in ("id", "label", "problem", "answer")}
    return record | {"image": buf.getvalue(), "truth": json.dumps(example["truth"], sort_keys=True)}


class SyntheticEmotions(Sequence):
    """`num_examples` examples of `make_example` for one (seed, split) (`size` x `size` images,
    or web-photo sizes with `sides`); train and test draw
    from different streams. Labels are balanced (exactly, when num_examples is a multiple
    of 8); so is the unfaithful share (floor or ceil of unfaithful_share * num_examples)."""

    def __init__(
        self,
        num_examples: int,
        seed: int,
        size: int = 56,
        split: str = "train",
        unfaithful_share: float = 0.0,
        sides: tuple[int, int] | None = None,
        detail: str = "size",
    ):
        if num_examples < 0:
            raise ValueError(f"SyntheticEmotions: num_examples={num_examples} is negative")
        if not 0.0 <= unfaithful_share <= 1.0:
            raise ValueError(f"SyntheticEmotions: unfaithful_share={unfaithful_share} must be in [0, 1]")
        _check_split(split)
        if detail not in DETAILS:
            raise ValueError(f"SyntheticEmotions: detail={detail!r}, expected one of {list(DETAILS)}")
        self.num_examples = num_examples
        self.seed = seed
        self.size = size
        self.split = split
        self.unfaithful_share = unfaithful_share
        self.sides = tuple(sides) if sides else None
        self.detail = detail

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"SyntheticEmotions: index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.num_examples
        if not 0 <= index < self.num_examples:
            raise IndexError(f"SyntheticEmotions: index {index} out of range for {self.num_examples} examples")
        return make_example(
            int(index), self.seed, self.size, self.split, self.unfaithful_share, self.sides, self.detail
        )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"synthetic: split={split!r}, expected one of {sorted(SPLITS)}")


def _rng(seed: int, split: str, stream: int, index: int) -> np.random.Generator:
    _check_split(split)
    if seed < 0 or index < 0:
        raise ValueError(f"synthetic: seed={seed} and index={index} must be non-negative")
    return np.random.default_rng([seed, SPLITS[split], stream, index])


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _draw(draw: PIL.ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour, rng) -> None:
    """Draws figure `kind` of radius `r` centred at (cx, cy)."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "ball":
        draw.ellipse(box, fill=colour)
    elif kind == "cross":
        width = max(2, round(r / 3))
        draw.line((cx - r, cy - r, cx + r, cy + r), fill=colour, width=width)
        draw.line((cx - r, cy + r, cx + r, cy - r), fill=colour, width=width)
    elif kind == "mountain":
        draw.polygon([(cx - r, cy + r), (cx + r, cy + r), (cx + rng.uniform(-r, r) / 3, cy - r)], fill=colour)
    elif kind == "sun":
        draw.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=colour)
        for k in range(8):
            a = k * math.pi / 4
            draw.line(
                (cx + 0.65 * r * math.cos(a), cy + 0.65 * r * math.sin(a), cx + r * math.cos(a), cy + r * math.sin(a)),
                fill=colour,
                width=2,
            )
    elif kind == "dots":
        # One dot in the middle, six around it, turned at random: they never overlap, so the
        # drawn area follows r (random scattered dots overlapped by chance and hid the size).
        turn, d = rng.uniform(0, math.pi / 3), r / 4
        for k in range(7):
            a, rho = turn + k * math.pi / 3, (0.0 if k == 6 else 0.65 * r)
            x, y = cx + rho * math.cos(a), cy + rho * math.sin(a)
            draw.ellipse((x - d, y - d, x + d, y + d), fill=colour)
    elif kind == "star":
        points = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rk = r if k % 2 == 0 else 0.45 * r
            points.append((cx + rk * math.cos(a), cy + rk * math.sin(a)))
        draw.polygon(points, fill=colour)
    elif kind == "eyes":
        w, h = 0.45 * r, 0.3 * r
        for ex in (cx - 0.5 * r, cx + 0.5 * r):
            draw.ellipse((ex - w, cy - h, ex + w, cy + h), fill=colour)
            draw.ellipse((ex - h / 2, cy - h / 2, ex + h / 2, cy + h / 2), fill=(0, 0, 0))
    elif kind == "rain":
        # Eight streaks on a 4 x 2 grid, jittered, as wide as r allows: the area follows r^2.
        width = max(1, round(r / 5))
        for k in range(8):
            x = (-0.8 + 0.5 * (k % 4)) * r + rng.uniform(-0.1, 0.1) * r
            y = (-0.4 + 0.8 * (k // 4)) * r + rng.uniform(-0.1, 0.1) * r
            draw.line((cx + x, cy + y - 0.3 * r, cx + x + 0.2 * r, cy + y + 0.3 * r), fill=colour, width=width)
    else:
        raise ValueError(f"synthetic: unknown figure kind {kind!r}")
