"""What an evaluation reports, from its per-response rows: confusion matrix, per-class
accuracy, the results.json entry of a data set, Markdown tables and a confusion heatmap.

Pure functions of python values (no jax). L labels; the confusion matrix is [L, L + 1]: row
= the record's label, column = the greedy prediction, the last column UNPARSED (no box, or a
boxed answer that is none of the labels).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

UNPARSED = "unparsed"
FAITHFULNESS = ("image_faithful", "answer_coherent")  # rates of data sets with a truth (emo_r3/faithfulness.py)
CELL = 48  # heatmap cell side, pixels
_PAD = 8
_FONT_SIZE = 14
_LOW, _HIGH = np.array([255, 255, 255]), np.array([8, 48, 107])  # white -> dark blue


def prediction_column(prediction: str, labels: Sequence[str]) -> str:
    """The confusion column of a boxed answer: the label it names (compared lower-cased, as
    accuracy is), else UNPARSED."""
    low = prediction.lower()
    return low if low in labels else UNPARSED


def confusion_matrix(true_labels: Sequence[str], predictions: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """counts [L, L + 1]: counts[i][j] responses to records of labels[i] whose prediction
    falls in column j (labels + [UNPARSED]). Raises on a true label outside `labels`."""
    columns = [*labels, UNPARSED]
    counts = [[0] * len(columns) for _ in labels]
    for true, pred in zip(true_labels, predictions, strict=True):
        if true not in labels:
            raise ValueError(f"confusion_matrix: label {true!r} is not one of {list(labels)}")
        counts[labels.index(true)][columns.index(prediction_column(pred, labels))] += 1
    return counts


def per_class_accuracy(counts: list[list[int]], labels: Sequence[str]) -> dict[str, dict]:
    """{label: {"count": n_i, "accuracy": counts[i][i] / n_i (None when n_i = 0)}}."""
    out = {}
    for i, label in enumerate(labels):
        n = sum(counts[i])
        out[label] = {"count": n, "accuracy": counts[i][i] / n if n else None}
    return out


def _rates(faithfulness: dict) -> dict:
    """The overall rates of an `evaluate` result's `faithfulness` entry (its count and per-class
    split left out)."""
    return {k: v for k, v in faithfulness.items() if k not in ("count", "per_class")}


def summarize(labels: Sequence[str], greedy: dict, sampled: dict) -> dict:
    """The results.json entry of one data set from `evaluation.evaluate`'s greedy (n = 1, with
    reflection) and sampled (n = k) results. The sampled accuracy is the mean and the
    population std (ddof 0) of the k runs' accuracies. Where the records carry a truth, the
    faithfulness rates join greedy, sampled and (greedy) per_class; else they are absent."""
    rows = greedy["responses"]
    counts = confusion_matrix([r["label"] for r in rows], [r["prediction"] for r in rows], labels)
    runs = sampled["run_accuracies"]
    entry = {
        "num_examples": len(rows),
        "labels": list(labels),
        "greedy": {k: greedy[k] for k in ("accuracy", "format_rate", "response_length", "coherence", "consistency")},
        "sampled": {
            "samples": len(runs),
            "accuracy_mean": float(np.mean(runs)),
            "accuracy_std": float(np.std(runs)),
            "run_accuracies": runs,
            "format_rate": sampled["format_rate"],
            "response_length": sampled["response_length"],
        },
        "per_class": per_class_accuracy(counts, labels),
        "confusion": {"rows": list(labels), "columns": [*labels, UNPARSED], "counts": counts},
    }
    if "faithfulness" in greedy:
        entry["greedy"].update(_rates(greedy["faithfulness"]))
        for label, rates in greedy["faithfulness"]["per_class"].items():
            entry["per_class"][label].update(_rates(rates))
    if "faithfulness" in sampled:
        entry["sampled"].update(_rates(sampled["faithfulness"]))
    return entry


# ---------------------------------------------------------------- Markdown
def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table: the header, its rule, one line per row (cells as str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:.3f}"


def summary_table(datasets: dict[str, dict]) -> str:
    """One Markdown row per data set (`summarize` entries by name)."""
    k = {d["sampled"]["samples"] for d in datasets.values()}
    header = [
        "data set",
        "n",
        "greedy acc",
        f"sampled acc (mean ± std, k={'/'.join(map(str, sorted(k)))})",
        "format",
        "coherence",
        "consistency",
        "length",
        "image-faithful",
        "answer-coherent",
    ]
    rows = []
    for name, d in datasets.items():
        g, s = d["greedy"], d["sampled"]
        rows.append(
            [
                name,
                d["num_examples"],
                f"{g['accuracy']:.3f}",
                f"{s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f}",
                f"{g['format_rate']:.3f}",
                f"{g['coherence']:.3f}",
                f"{g['consistency']:.3f}",
                f"{g['response_length']:.1f}",
                *(_cell(g.get(k)) for k in FAITHFULNESS),
            ]
        )
    return markdown_table(header, rows)


def markdown(results: dict) -> str:
    """results.md: the settings, the summary table, then per data set its per-class greedy
    accuracy and confusion matrix."""
    parts = [
        f"# Evaluation of `{results['checkpoint']}`",
        f"Prompt: {'SET' if results['use_set'] else 'plain (no SET suffix)'}; greedy and "
        f"{results['samples']} sampled runs at T={results['sampled_temperature']}, "
        f"top_p={results['sampled_top_p']}; up to {results['max_response_len']} new tokens. "
        "Format, coherence, consistency and length are of the greedy responses; coherence and "
        "consistency are the policy's own reflective judgements (spec section 4). Image-faithful and "
        "answer-coherent are checked against the data set's truth, where it has one (– where not).",
        summary_table(results["datasets"]),
    ]
    for name, d in results["datasets"].items():
        per = d["per_class"]
        parts.append(f"## {name}")
        faithful = [k for k in FAITHFULNESS if k in d["greedy"]]  # data sets with a truth
        parts.append(
            markdown_table(
                ["label", "n", "greedy acc", *faithful],
                [[label, v["count"], *(_cell(v.get(k)) for k in ["accuracy", *faithful])] for label, v in per.items()],
            )
        )
        conf = d["confusion"]
        parts.append("Confusion (rows: label, columns: greedy prediction):")
        parts.append(
            markdown_table(
                ["label \\ prediction", *conf["columns"]], [[r, *c] for r, c in zip(conf["rows"], conf["counts"])]
            )
        )
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- heatmap
def confusion_image(counts: list[list[int]], labels: Sequence[str], title: str) -> Image.Image:
    """An RGB heatmap of `counts` [L, L + 1]: each cell shows its count, shaded by its share
    of the row; row labels on the left, column labels (labels + UNPARSED) written upwards
    above the grid, `title` on top. Cells are CELL pixels square."""
    font = ImageFont.load_default(size=_FONT_SIZE)
    columns = [*labels, UNPARSED]
    text_w = max(int(font.getlength(t)) for t in [*columns, "label"]) + 2 * _PAD
    title_h = _FONT_SIZE + 2 * _PAD
    left, top = text_w, title_h + text_w
    width = max(left + CELL * len(columns) + _PAD, int(font.getlength(title)) + 2 * _PAD)
    img = Image.new("RGB", (width, top + CELL * len(labels) + _PAD), "white")
    draw = ImageDraw.Draw(img)
    draw.text((_PAD, _PAD), title, fill="black", font=font)
    for j, name in enumerate(columns):  # upward text: draw horizontally, rotate, paste
        strip = Image.new("RGB", (text_w, CELL), "white")
        ImageDraw.Draw(strip).text((_PAD, CELL // 2), name, fill="black", font=font, anchor="lm")
        img.paste(strip.rotate(90, expand=True), (left + j * CELL, title_h))
    arr = np.asarray(counts, np.float64)
    share = arr / np.maximum(arr.sum(1, keepdims=True), 1)
    for i, name in enumerate(labels):
        y = top + i * CELL
        draw.text((left - _PAD, y + CELL // 2), name, fill="black", font=font, anchor="rm")
        for j in range(len(columns)):
            x = left + j * CELL
            colour = tuple(int(v) for v in _LOW + share[i, j] * (_HIGH - _LOW))
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=colour, outline=(200, 200, 200))
            ink = "white" if share[i, j] > 0.5 else "black"
            draw.text((x + CELL // 2, y + CELL // 2), str(counts[i][j]), fill=ink, font=font, anchor="mm")
    return img


def write_run_results(workdir: str, results: dict) -> None:
    """A training run's results.json, and its held-out accuracies printed."""
    epath.Path(workdir, "results.json").write_text(json.dumps(results, indent=2))
    for name, ev in (("cold start", results["cold_start"]), ("GRPO", results["grpo"])):
        if ev:
            greedy, sampled = ev["greedy_accuracy"], ev["sampled_accuracy"]
            print(f"\nheld-out accuracy, {name}: greedy {greedy:.3f}, sampled {sampled:.3f}", end="")
            if "greedy_image_faithful" in ev:
                rates = [f"{k.replace('_', '-')} {ev['greedy_' + k]:.3f}" for k in FAITHFULNESS]
                print(f"; greedy {', '.join(rates)}", end="")
    print()
