"""Supervised examples that teach a tiny judge the two reflection questions, from the truth.

The questions are exactly those the judge is asked at train time: emo_r3.rewards'
text_reflection_prompt and image_reflection_prompt applied to a SET response written in the
synthetic vocabulary (synthetic.set_answer), so the prompts cannot drift from the reward's.
For a response with both spans the two compat modes ask the same text.

Per synthetic record (its image and truth), four examples, in this order:
  text            steps 1-2 with the drawn figure and a feeling word of the label -> the label
  text_feeling    the same figure with a feeling word of another label -> that other label:
                  the text's feeling decides, as the text alone implies it (so coherence with
                  the true label scores 0 for a response whose feeling belongs elsewhere)
  image_true      the image + step 1 naming the drawn figure with its detail (synthetic.DETAILS:
                  its size class or the image's light) -> "yes"
  image_wrong_*   the image + step 1 with one wrong detail -> "no"; the detail is, record by
                  record in turn (WRONG_CYCLE), the figure (another label's, same size or
                  light), the size class or the light, or the colour word (the drawn noun in
                  another figure's colour)
So yes and no are balanced exactly, and the wrong details within one as WRONG_CYCLE says.

  examples = reflection_examples(train_records, labels, seed)      # cold start
  held_out = held_out_examples(128, seed, image_size, labels, "size")  # the judge's accuracy
  accuracy = judge_accuracy(held_out, judge_answers)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from emor3_jax.data.sources import read_split
from emor3_jax.data.synthetic import DETAIL_WORDS, FEELINGS, FIGURES, describe, detail_of, set_answer
from emor3_jax.emo_r3 import rewards
from emor3_jax.emo_r3.faithfulness import parse_truth

TEXT_KINDS = ("text", "text_feeling")
# detail -> the wrong details of the image_wrong questions, record by record in turn. The light
# takes half the turns: the figure and its colour follow from the label, which the judge learns
# from every question, the light only the image shows; at a third of the turns a 600-step cold
# start left the judge saying "yes" to every wrong light (docs/results.md, "A detail the tiny
# model sees"). The size keeps thirds: half the turns taught it no better (docs/results.md, "The
# tiny judge"), and the main job's judge stays as it was.
WRONG_CYCLE = {
    "size": ("image_wrong_figure", "image_wrong_size", "image_wrong_colour"),
    "light": ("image_wrong_figure", "image_wrong_light", "image_wrong_colour", "image_wrong_light"),
}
_COLOURS = sorted({colour for colour, _ in FIGURES.values()})


@dataclasses.dataclass(frozen=True)
class ReflectionExample:
    """One judge question and its answer.

    prompt: the question as the judge gets it before the chat template (`<image>` marks the
      image in image questions); target: the answer to learn ("yes", "no" or a label);
      uses_image: whether `image` (the record's encoded image) goes with the prompt;
      kind: one of TEXT_KINDS, "image_true" or an image_wrong_* kind; record_id: the record it was made from.
    """

    prompt: str
    target: str
    uses_image: bool
    image: bytes
    kind: str
    record_id: str


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    labels = tuple(labels)
    unknown = [label for label in labels if label not in FEELINGS]
    if len(labels) < 2 or unknown:
        raise ValueError(f"labels {list(labels)}: need >= 2 labels of the synthetic vocabulary (unknown: {unknown})")
    return labels


def _text_example(record: dict, step1: str, feeling_label: str, labels, rng, kind: str) -> ReflectionExample:
    feeling = str(rng.choice(FEELINGS[feeling_label]))
    prompt = rewards.text_reflection_prompt(set_answer(step1, feeling, record["label"]), labels, "robust")
    return ReflectionExample(prompt, feeling_label, False, b"", kind, record["id"])


def _image_example(record: dict, step1: str, target: str, kind: str) -> ReflectionExample:
    # The image span ends before step 2, so the feeling word there does not matter.
    response = set_answer(step1, FEELINGS[record["label"]][0], record["label"])
    return ReflectionExample(
        rewards.image_reflection_prompt(response, "robust"), target, True, record["image"], kind, record["id"]
    )


def wrong_description(truth: dict, kind: str, rng: np.random.Generator) -> str:
    """Step-1 words for the drawn figure of `truth` with the one wrong detail `kind`
    (one of WRONG_CYCLE[the truth's detail])."""
    colour, noun = truth["colour"], truth["figure"]
    detail, k = detail_of(truth)
    if kind == "image_wrong_figure":
        others = [look for look in FIGURES.values() if look[1] != noun]
        return describe(*others[int(rng.integers(len(others)))], detail, k)
    if kind == f"image_wrong_{detail}":
        others = [c for c in range(len(DETAIL_WORDS[detail])) if c != k]
        return describe(colour, noun, detail, int(rng.choice(others)))
    if kind == "image_wrong_colour":
        return describe(str(rng.choice([c for c in _COLOURS if c != colour])), noun, detail, k)
    raise ValueError(f"wrong_description: kind {kind!r} is not one of {sorted(set(WRONG_CYCLE[detail]))}")


def reflection_examples(records: Sequence[dict], labels: Sequence[str], seed: int) -> list[ReflectionExample]:
    """Four examples per record (module docstring), deterministic given (records, seed).
    `records` need `id`, `image`, `label` and a synthetic `truth`."""
    labels = _check_labels(labels)
    out = []
    for index, record in enumerate(records):
        if record["label"] not in labels:
            raise ValueError(f"record {record['id']!r}: label {record['label']!r} is not one of {list(labels)}")
        truth = parse_truth(record["truth"])
        rng = np.random.default_rng([seed, index])
        detail, k = detail_of(truth)
        drawn = describe(truth["colour"], truth["figure"], detail, k)
        other = str(rng.choice([label for label in labels if label != record["label"]]))
        wrong = WRONG_CYCLE[detail][index % len(WRONG_CYCLE[detail])]
        out += [
            _text_example(record, drawn, record["label"], labels, rng, "text"),
            _text_example(record, drawn, other, labels, rng, "text_feeling"),
            _image_example(record, drawn, "yes", "image_true"),
            _image_example(record, wrong_description(truth, wrong, rng), "no", wrong),
        ]
    return out


def held_out_examples(
    count: int, seed: int, image_size: int, labels: Sequence[str], detail: str
) -> list[ReflectionExample]:
    """`reflection_examples` of `count` synthetic records of the test split (images the cold
    start never sees), step 1 naming `detail` (synthetic.DETAILS): 4 * count questions to
    measure the judge on."""
    records = read_split(
        "synthetic", "", "", "test", labels, count=count, seed=seed, image_size=image_size, synthetic_detail=detail
    )
    return reflection_examples(list(records), labels, seed)


def judge_accuracy(examples: Sequence[ReflectionExample], answers: Sequence[str]) -> dict:
    """Share of the judge's decoded `answers` that are right, read as the robust reward reads
    them: a text answer is right when rewards.coherence_score against the target is 1; an
    image answer when rewards.consistency_score is 1 for "yes", 0 for "no" (neither word is
    wrong). Returns {"overall", "text", "image", "count", "per_kind": {kind: accuracy}}."""
    if len(examples) != len(answers):
        raise ValueError(f"judge_accuracy: {len(examples)} examples but {len(answers)} answers")
    if not examples:
        raise ValueError("judge_accuracy: no examples")
    right: dict[str, list[bool]] = {}
    for ex, answer in zip(examples, answers):
        if ex.uses_image:
            ok = rewards.consistency_score(answer, "robust") == {"yes": 1.0, "no": 0.0}[ex.target]
        else:
            ok = rewards.coherence_score(answer, ex.target, "robust") == 1.0
        right.setdefault(ex.kind, []).append(ok)

    def share(kinds) -> float | None:
        rows = [ok for kind in kinds for ok in right.get(kind, [])]
        return sum(rows) / len(rows) if rows else None

    return {
        "overall": share(right),
        "text": share(TEXT_KINDS),
        "image": share([kind for kind in right if kind.startswith("image_")]),
        "count": len(examples),
        "per_kind": {kind: share([kind]) for kind in sorted(right)},
    }
