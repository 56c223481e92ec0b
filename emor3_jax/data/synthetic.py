"""A synthetic emotion data set, shipped as code, for tests and CPU smoke runs.

Each of the 8 EmoSet labels has its own background colour and its own figure (shape and
colour): amusement a pink ball on yellow, anger a dark X on red, awe a white mountain
on navy, contentment a warm sun on green, disgust brown dots on olive, excitement a red
star on orange, fear pale eyes on near-black, sadness dark rain on grey-blue. Shades,
figure size and position are jittered and mild noise is added, so examples differ but the
label stays a simple function of the pixels (the mean colour alone separates the classes).

The reference answers follow the SET format in a few words each, short enough for the
~1000-token test tokenizer (under 40 tokens). Step 3 gives valence and arousal as
"positive, high" (the word "arousal" alone costs 5 tokens there).

Everything is a function of (index, seed, split): no files, no downloads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw

from emor3_jax.data.prompts import EMOSET_LABELS, VALENCE_AROUSAL, question

SPLITS = {"train": 0, "test": 1}
_LABEL_STREAM, _IMAGE_STREAM = 0, 1

# label -> (background RGB, figure RGB, figure kind)
_LOOK = {
    "amusement": ((235, 205, 60), (240, 100, 190), "ball"),
    "anger": ((200, 35, 35), (25, 20, 20), "cross"),
    "awe": ((40, 50, 140), (245, 245, 250), "mountain"),
    "contentment": ((75, 165, 80), (250, 235, 140), "sun"),
    "disgust": ((130, 120, 40), (85, 50, 20), "dots"),
    "excitement": ((245, 135, 25), (190, 20, 60), "star"),
    "fear": ((28, 22, 40), (225, 225, 200), "eyes"),
    "sadness": ((115, 130, 150), (30, 40, 100), "rain"),
}
# label -> step-1 text for a (small, medium, large) figure: what is drawn.
_STEP1 = {
    "amusement": (" small pink ball", " pink ball", " huge pink ball"),
    "anger": (" small dark X", " dark X", " huge dark X"),
    "awe": (" small white mountain", " white mountain", " huge white mountain"),
    "contentment": (" small warm sun", " warm sun", " huge warm sun"),
    "disgust": (" small brown dots", " brown dots", " huge brown dots"),
    "excitement": (" small red star", " red star", " huge red star"),
    "fear": (" small pale eyes", " pale eyes", " huge pale eyes"),
    "sadness": (" light rain", " dark rain", " heavy rain"),
}
# label -> step-2 choices: how a viewer would feel.
_STEP2 = {
    "amusement": (" fun", " silly", " laugh"),
    "anger": (" rage", " anger"),
    "awe": (" wonder", " awe"),
    "contentment": (" peace", " calm", " relaxed"),
    "disgust": (" sick", " disgust", " dirt"),
    "excitement": (" energy", " cheer", " jump"),
    "fear": (" threat", " horror", " fear"),
    "sadness": (" grief", " sorrow", " alone"),
}
# Figure radius as a fraction of the image side; thirds of the range are small/medium/large.
_RADIUS = (0.14, 0.30)


def reference_answer(label: str, size_class: int, step2_choice: int) -> str:
    """The SET-formatted reference response for a drawn figure of `label`."""
    valence, arousal = VALENCE_AROUSAL[label]
    step1 = _STEP1[label][size_class]
    step2 = _STEP2[label][step2_choice % len(_STEP2[label])]
    return f"<step1>{step1} </step1><step2>{step2} </step2><step3> {valence}, {arousal} </step3> \\boxed{{{label}}}"


def label_of(index: int, seed: int, split: str = "train") -> str:
    """Label of example `index`: each block of 8 consecutive indices holds every label once,
    in an order drawn from (seed, split, index // 8)."""
    order = _rng(seed, split, _LABEL_STREAM, index // len(EMOSET_LABELS)).permutation(len(EMOSET_LABELS))
    return EMOSET_LABELS[order[index % len(EMOSET_LABELS)]]


def make_example(index: int, seed: int, size: int = 56, split: str = "train") -> dict:
    """Example `index` of the (seed, split) stream: id, image (RGB, size x size), label,
    problem, answer, valence, arousal."""
    if size < 28:
        raise ValueError(f"make_example: size={size} is below the 28-pixel minimum")
    label = label_of(index, seed, split)
    rng = _rng(seed, split, _IMAGE_STREAM, index)
    background, figure, kind = _LOOK[label]

    # Background: jittered shade, a mild vertical gradient, noise added at the end.
    shade = np.array(background, np.float64) + rng.uniform(-18, 18, 3) + rng.uniform(-10, 10)
    ramp = np.linspace(-1, 1, size)[:, None, None] * rng.uniform(-12, 12)
    canvas = np.broadcast_to(shade + ramp, (size, size, 3))
    image = PIL.Image.fromarray(_to_uint8(canvas))

    fraction = rng.uniform(*_RADIUS)
    size_class = min(2, int(3 * (fraction - _RADIUS[0]) / (_RADIUS[1] - _RADIUS[0])))
    radius = fraction * size
    margin = radius + 2
    cx, cy = rng.uniform(margin, size - margin, 2)
    colour = tuple(int(c) for c in np.clip(np.array(figure) + rng.uniform(-15, 15, 3), 0, 255))
    _draw(PIL.ImageDraw.Draw(image), kind, cx, cy, radius, colour, rng)

    pixels = np.asarray(image, np.float64) + rng.normal(0, 6, (size, size, 3))
    valence, arousal = VALENCE_AROUSAL[label]
    return {
        "id": f"synthetic-{split}-{seed}-{index:06d}",
        "image": PIL.Image.fromarray(_to_uint8(pixels)),
        "label": label,
        "problem": question(EMOSET_LABELS),
        "answer": reference_answer(label, size_class, int(rng.integers(len(_STEP2[label])))),
        "valence": valence,
        "arousal": arousal,
    }


class SyntheticEmotions(Sequence):
    """`num_examples` examples of `make_example` for one (seed, split); train and test draw
    from different streams. Labels are balanced (exactly, when num_examples is a multiple
    of 8)."""

    def __init__(self, num_examples: int, seed: int, size: int = 56, split: str = "train"):
        if num_examples < 0:
            raise ValueError(f"SyntheticEmotions: num_examples={num_examples} is negative")
        _check_split(split)
        self.num_examples = num_examples
        self.seed = seed
        self.size = size
        self.split = split

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"SyntheticEmotions: index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.num_examples
        if not 0 <= index < self.num_examples:
            raise IndexError(f"SyntheticEmotions: index {index} out of range for {self.num_examples} examples")
        return make_example(int(index), self.seed, self.size, self.split)


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
        for _ in range(int(rng.integers(5, 10))):
            x, y = rng.uniform(-r, r, 2) * 0.8
            d = r / 4
            draw.ellipse((cx + x - d, cy + y - d, cx + x + d, cy + y + d), fill=colour)
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
        for _ in range(int(rng.integers(6, 11))):
            x, y = rng.uniform(-r, r * 0.7, 2)
            draw.line((cx + x, cy + y - 0.3 * r, cx + x + 0.2 * r, cy + y + 0.3 * r), fill=colour, width=2)
    else:
        raise ValueError(f"synthetic: unknown figure kind {kind!r}")
