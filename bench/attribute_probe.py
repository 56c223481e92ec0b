"""Can the tiny model see a figure's size class? Where the image judge's size check fails.

The image reflection asks whether step 1 ("huge pink ball") describes the image; the taught
tiny judge gets the figure and the colour right but answers "yes" to nearly every wrong size
(docs/results.md "The tiny judge"). This script tells where the size is lost, on the synthetic set
of a run (its seed, image size and labels):

  mean colour   per label, the image's mean colour projected on (figure - background) colour,
                cut between the training classes' medians: what the pixels give a linear
                reader (the background shade and figure colour are jittered)
  vision probe  an MLP (256 hidden, full-batch AdamW) and a linear probe from the run's merged
                vision tokens (the LM's image inputs, flattened) to the size class
  policy        with --responses (eval's test_responses.jsonl of the same run): how often the
                greedy step 1 names the drawn size, and its size words per drawn class

    python -m bench.size_probe --checkpoint workdir/tiny [--responses DIR/test_responses.jsonl]

Prints the accuracies (chance 1/3) and `ratio policy_vs_vision_probe: x` (the policy's size
accuracy over the MLP probe's: 1 when the LM uses what the vision tower gives it).
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
from emor3_jax.data.synthetic import _LOOK, SIZE_WORDS, make_example
from emor3_jax.emo_r3.faithfulness import figures_named
from emor3_jax.emo_r3.rewards import image_span
from emor3_jax.load import load_step
from emor3_jax.models.qwen25_vl.vision import order_pixels, vision_layout


def mean_colour_share(example: dict) -> float:
    """The image's mean colour on the (figure - background) axis: ~ the figure's pixel share."""
    background, figure, _ = _LOOK[example["label"]]
    axis = np.subtract(figure, background, dtype=np.float64)
    mean = np.asarray(example["image"], np.float64).mean((0, 1)) - background
    return float(mean @ axis / (axis @ axis))


def mean_colour_accuracy(train: list[dict], test: list[dict]) -> float:
    values = collections.defaultdict(list)
    for ex in train:
        values[ex["label"], ex["truth"]["size_class"]].append(mean_colour_share(ex))
    right = []
    for ex in test:
        medians = [np.median(values[ex["label"], k]) for k in range(len(SIZE_WORDS))]
        cuts = [(a + b) / 2 for a, b in zip(medians, medians[1:])]
        right.append(int(np.searchsorted(cuts, mean_colour_share(ex))) == ex["truth"]["size_class"])
    return float(np.mean(right))


def vision_tokens(model, processor: ImageProcessor, examples: list[dict]) -> np.ndarray:
    """[N, M * D]: each image's merged vision tokens, flattened (every image the same size)."""
    rows = []
    for ex in examples:
        pixels, grid = processor(ex["image"])
        layout = vision_layout(np.asarray(grid).reshape(1, 3), None, model.cfg.vision)
        rows.append(np.asarray(model.visual(jnp.asarray(order_pixels(pixels, layout)), layout)).reshape(-1))
    return np.stack(rows)


def probe_accuracy(x_train, y_train, x_test, y_test, hidden: int, steps: int = 2000) -> float:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    d, classes = x_train.shape[1], len(SIZE_WORDS)
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


def policy_sizes(responses: str, seed: int, image_size: int) -> tuple[float, dict]:
    """(share of greedy responses naming the drawn size class, {drawn class: Counter of named})."""
    named, right = collections.defaultdict(collections.Counter), []
    with open(responses) as f:
        for line in f:
            row = json.loads(line)
            index = int(row["id"].rsplit("-", 1)[1])
            truth = make_example(index, seed, image_size, "test")["truth"]
            mentions = figures_named(image_span(row["response"]))
            size = mentions[0][0] if len(mentions) == 1 else None
            named[truth["size_class"]]["none" if size is None else (SIZE_WORDS[size] or "medium")] += 1
            right.append(size == truth["size_class"])
    return float(np.mean(right)), dict(named)


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
    train = [make_example(i, seed, size, "train") for i in range(args.train)]
    test = [make_example(i, seed, size, "test") for i in range(args.test)]
    y_train = np.array([ex["truth"]["size_class"] for ex in train])
    y_test = np.array([ex["truth"]["size_class"] for ex in test])
    print(f"{args.checkpoint} step {step}: size class of {args.test} test images (chance 0.333)")
    print(f"mean colour (pixels, per-label cuts): {mean_colour_accuracy(train, test):.3f}")
    processor = ImageProcessor(min_pixels=data["min_pixels"], max_pixels=data["max_pixels"])
    x_train, x_test = vision_tokens(model, processor, train), vision_tokens(model, processor, test)
    mlp = probe_accuracy(x_train, y_train, x_test, y_test, hidden=256)
    linear = probe_accuracy(x_train, y_train, x_test, y_test, hidden=0)
    print(f"vision probe: MLP {mlp:.3f}, linear {linear:.3f}")
    if args.responses:
        share, named = policy_sizes(args.responses, seed, size)
        print(f"policy (greedy step 1 names the drawn size): {share:.3f}")
        for drawn in sorted(named):
            print(f"  drawn {SIZE_WORDS[drawn] or 'medium'}: named {dict(named[drawn])}")
        print(f"ratio policy_vs_vision_probe: {share / mlp:.3f}")


if __name__ == "__main__":
    main()
