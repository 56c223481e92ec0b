"""Can the tiny model see what step 1 is asked to say of an image? Per attribute, from the
pixels to the policy's words.

Step 1 names the figure (its noun and colour word, both given by the label) and the image's
detail (data.synthetic_detail, synthetic.DETAILS): the figure's size class, or the light (day
or night, drawn apart from the label). The image reflection asks whether step 1 describes the
image, so a consistency reward can only teach what the policy and its judge can see. On the
synthetic set of a run (its seed, image size, labels and detail):

  pixels        per label, a one-number reader cut between the training classes' medians: for
                the size the image's mean colour projected on (figure - background) colour
                (~ the figure's pixel share), for the light its mean grey level
  vision probe  an MLP (256 hidden, full-batch AdamW) and a linear probe from the run's merged
                vision tokens (the LM's image inputs, flattened) to the detail's class
  policy        with --responses (eval's test_responses.jsonl of the same run): how often the
                greedy step 1 names the drawn figure, its colour and the drawn detail (and no
                other), and the detail's words per drawn class

    python -m bench.attribute_probe --checkpoint workdir/tiny [--responses DIR/test_responses.jsonl]

Prints the accuracies and `ratio policy_vs_vision_probe: x` (the policy's accuracy on the detail
over the MLP probe's: 1 when the LM uses what the vision tower gives it). Issue 25's bar: the
policy names each attribute for at least 0.9 of the test images after the cold start. Run it
with JAX_PLATFORMS=cpu on a machine with libtpu installed but no TPU.
"""

from __future__ import annotations

import argparse
import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.common import make_mesh
from emor3_jax.core import paths
from emor3_jax.core.sharding import DEFAULT_RULES
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.data.synthetic import _LOOK, DETAIL_WORDS, DETAILS, detail_of, make_example
from emor3_jax.emo_r3.faithfulness import figures_named, lights_named
from emor3_jax.emo_r3.rewards import image_span
from emor3_jax.load import load_step
from emor3_jax.models.qwen25_vl.vision import order_pixels, vision_layout

# detail -> the names of its classes, as printed (no size word: medium)
CLASS_NAMES = {detail: tuple(w or "medium" for w in words) for detail, words in DETAIL_WORDS.items()}


def pixel_reading(example: dict, detail: str) -> float:
    """One number of the pixels that orders the detail's classes within a label: the mean
    colour on the (figure - background) axis (~ the figure's pixel share) for the size, the
    mean grey level for the light."""
    pixels = np.asarray(example["image"], np.float64)
    if detail == "light":
        return float(pixels.mean())
    background, figure, _ = _LOOK[example["label"]]
    axis = np.subtract(figure, background, dtype=np.float64)
    return float((pixels.mean((0, 1)) - background) @ axis / (axis @ axis))


def pixel_accuracy(train: list[dict], test: list[dict], detail: str) -> float:
    """Share of `test` whose class `pixel_reading`, cut per label halfway between the training
    classes' medians, names."""
    values = collections.defaultdict(list)
    for ex in train:
        values[ex["label"], detail_of(ex["truth"])[1]].append(pixel_reading(ex, detail))
    right = []
    for ex in test:
        medians = [np.median(values[ex["label"], k]) for k in range(len(CLASS_NAMES[detail]))]
        cuts = [(a + b) / 2 for a, b in zip(medians, medians[1:])]
        right.append(int(np.searchsorted(cuts, pixel_reading(ex, detail))) == detail_of(ex["truth"])[1])
    return float(np.mean(right))


def vision_tokens(model, processor: ImageProcessor, examples: list[dict], batch: int = 64) -> np.ndarray:
    """[N, M * D]: each image's merged vision tokens, flattened (every image the same size),
    `batch` images per tower call."""
    rows = []
    for start in range(0, len(examples), batch):
        chunk = [processor(ex["image"]) for ex in examples[start : start + batch]]
        grids = np.concatenate([np.asarray(grid).reshape(1, 3) for _, grid in chunk])
        layout = vision_layout(grids, None, model.cfg.vision)
        pixels = np.concatenate([p for p, _ in chunk])
        rows.append(np.asarray(model.visual(jnp.asarray(order_pixels(pixels, layout)), layout)).reshape(len(chunk), -1))
    return np.concatenate(rows)


def probe_accuracy(x_train, y_train, x_test, y_test, classes: int, hidden: int, steps: int = 2000) -> float:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    d = x_train.shape[1]
    if hidden:
        params = {
            "w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d),
            "w2": jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden),
        }
        apply = lambda p, x: jax.nn.gelu(x @ p["w1"]) @ p["w2"]  # noqa: E731
    else:
        params = {"w": jnp.zeros((d, classes)), "b": jnp.zeros(classes)}
        apply = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    opt = optax.adamw(1e-3, weight_decay=1e-2)

    @jax.jit
    def step(p, s):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x_train), y_train).mean()  # noqa: E731
        grads = jax.grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return float((np.asarray(apply(params, x_test)).argmax(-1) == y_test).mean())


def policy_attributes(responses: str, seed: int, image_size: int, detail: str) -> tuple[dict, dict]:
    """({"figure", "colour", detail: share of greedy responses whose step 1 names the drawn one
    and no other}, {drawn class: Counter of the detail's words named})."""
    right, named = collections.defaultdict(list), collections.defaultdict(collections.Counter)
    names = CLASS_NAMES[detail]
    with open(responses) as f:
        for line in f:
            row = json.loads(line)
            index = int(row["id"].rsplit("-", 1)[1])
            truth = make_example(index, seed, image_size, "test", detail=detail)["truth"]
            drawn = detail_of(truth)[1]
            span = image_span(row["response"])
            mentions = figures_named(span)
            right["figure"].append([noun for _, _, noun in mentions] == [truth["figure"].lower()])
            right["colour"].append(len(mentions) == 1 and mentions[0][1] == (truth["colour"],))
            if detail == "size":  # no size word names the medium class
                said = [mentions[0][0]] if len(mentions) == 1 and mentions[0][0] is not None else []
            else:
                said = lights_named(span)
            right[detail].append(said == [drawn])
            named[names[drawn]]["+".join(names[k] for k in said) or "none"] += 1
    return {k: float(np.mean(v)) for k, v in right.items()}, dict(named)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, help="a training workdir (its latest step)")
    ap.add_argument("--responses", default="", help="eval's test_responses.jsonl of the same run")
    ap.add_argument("--train", type=int, default=512, help="synthetic training images for the probes")
    ap.add_argument("--test", type=int, default=256, help="synthetic test images")
    args = ap.parse_args()
    model, _, config, step = load_step(
        paths.join(args.checkpoint, "ckpt"),
        None,
        make_mesh(),
        DEFAULT_RULES,
        compute_dtype="float32",
        attention_impl="xla",
    )
    data = config["data"]
    if data["source"] != "synthetic" or tuple(data["image_sides"]):
        raise ValueError(
            f"{args.checkpoint}: needs a run on the square synthetic images (data.source=synthetic, "
            f"data.image_sides=()), got source {data['source']!r}, image_sides {tuple(data['image_sides'])}"
        )
    seed, size = config["seed"], data["image_size"]
    detail = data.get("synthetic_detail", "size")  # runs saved before the detail existed drew sizes
    if detail not in DETAILS:
        raise ValueError(f"{args.checkpoint}: data.synthetic_detail={detail!r} is not one of {list(DETAILS)}")
    train = [make_example(i, seed, size, "train", detail=detail) for i in range(args.train)]
    test = [make_example(i, seed, size, "test", detail=detail) for i in range(args.test)]
    y_train = np.array([detail_of(ex["truth"])[1] for ex in train])
    y_test = np.array([detail_of(ex["truth"])[1] for ex in test])
    classes = len(CLASS_NAMES[detail])
    print(f"{args.checkpoint} step {step}: the {detail} of {args.test} test images (chance {1 / classes:.3f})")
    print(f"pixels (per-label cuts): {pixel_accuracy(train, test, detail):.3f}")
    processor = ImageProcessor(min_pixels=data["min_pixels"], max_pixels=data["max_pixels"])
    x_train, x_test = vision_tokens(model, processor, train), vision_tokens(model, processor, test)
    mlp = probe_accuracy(x_train, y_train, x_test, y_test, classes, hidden=256)
    linear = probe_accuracy(x_train, y_train, x_test, y_test, classes, hidden=0)
    print(f"vision probe: MLP {mlp:.3f}, linear {linear:.3f}")
    if args.responses:
        shares, named = policy_attributes(args.responses, seed, size, detail)
        print("policy (greedy step 1 names the drawn one): " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
        for drawn in CLASS_NAMES[detail]:
            if drawn in named:
                print(f"  drawn {drawn}: named {dict(named[drawn])}")
        print(f"ratio policy_vs_vision_probe: {shares[detail] / mlp:.3f}")


if __name__ == "__main__":
    main()
