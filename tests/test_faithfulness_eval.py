"""Faithfulness in the evaluation: evaluate's rows carry the two flags for records with a truth
(and not for records without one), its rates are the hand-counted shares overall and per
class, and the report puts them in results.json's entry and the Markdown tables."""

import json

import jax
import numpy as np
import pytest

from emor3_jax.core.batches import Prompt
from emor3_jax.data.synthetic import set_answer
from emor3_jax.emo_r3 import rewards
from emor3_jax.emo_r3.task import EmoR3, Reflection
from emor3_jax.evaluation import report as eval_report
from emor3_jax.evaluation.evaluate import evaluate
from emor3_jax.sampling.methods import GREEDY
from emor3_jax.sampling.sampler import Samples

LABELS = ("awe", "fear", "sadness")


def _truth(figure, colour, size_class):
    return json.dumps({"figure": figure, "colour": colour, "size_class": size_class})


# (record, its scripted response, image_faithful, answer_coherent); None: no truth, no flags.
CASES = [
    (
        {"label": "awe", "truth": _truth("mountain", "white", 2)},
        set_answer("huge white mountain", "wonder", "awe"),
        1,
        1,
    ),
    # medium ("white mountain") said of a small one: not image-faithful, still coherent
    ({"label": "awe", "truth": _truth("mountain", "white", 0)}, set_answer("white mountain", "wonder", "awe"), 0, 1),
    # the feeling word "wonder" belongs to awe, the box says fear: faithful to the image only
    ({"label": "fear", "truth": _truth("eyes", "pale", 1)}, set_answer("pale eyes", "wonder", "fear"), 1, 0),
    ({"label": "sadness", "truth": ""}, "no box here", None, None),  # a real data set's record
]
RECORDS = [dict(rec, id=str(i)) for i, (rec, *_) in enumerate(CASES)]


class ScriptedEncoder:
    """Prompt ids are [record index]; the 'token' sampled is that index, decoded to its response."""

    def question(self, record):
        return "q"

    def record_prompt(self, record, text):
        return Prompt(np.array([int(record["id"])], np.int32))

    def decode(self, tokens, lengths):
        return [CASES[int(row[0])][1] for row in tokens]


class ScriptedSampler:
    def generate(self, model, prompts, *, key, max_new_tokens, n, params):
        ids = np.repeat([p.ids[0] for p in prompts], n)[:, None]
        rows = len(ids)
        return Samples(
            tokens=jax.numpy.asarray(ids),
            logprobs=jax.numpy.zeros((rows, 1)),
            lengths=jax.numpy.ones((rows,), np.int32),
            done=jax.numpy.ones((rows,), bool),
        )


def _task():
    return EmoR3(
        labels=LABELS,
        reward=rewards.RewardConfig(),
        reflection=Reflection(max_new=4, params=GREEDY),
        reflects=False,
    )


def _evaluate(n=1):
    return evaluate(
        ScriptedSampler(),
        None,
        ScriptedEncoder(),
        _task(),
        RECORDS,
        batch_size=3,  # the second batch is padded with repeats, whose rows are dropped
        key=jax.random.key(0),
        max_new=4,
        n=n,
    )


def test_rows_carry_the_flags_only_where_the_record_has_a_truth():
    res = _evaluate(n=2)
    rows = res["responses"]
    assert len(rows) == 2 * len(CASES)
    for row, (_, _, image, coherent) in zip(rows, [c for c in CASES for _ in range(2)]):
        if image is None:
            assert "image_faithful" not in row and "answer_coherent" not in row
        else:
            assert (row["image_faithful"], row["answer_coherent"]) == (bool(image), bool(coherent))
    f = res["faithfulness"]
    # 3 records with a truth, 2 samples each: 4 of 6 rows image-faithful, 4 of 6 coherent (the
    # record without truth does not count as 0: that would give 4/8).
    assert f["count"] == 6
    assert f["image_faithful"] == pytest.approx(4 / 6) and f["answer_coherent"] == pytest.approx(4 / 6)
    assert f["per_class"] == {
        "awe": {"image_faithful": 0.5, "answer_coherent": 1.0, "count": 4},
        "fear": {"image_faithful": 1.0, "answer_coherent": 0.0, "count": 2},
    }


def test_without_any_truth_the_rates_are_absent():
    res = evaluate(
        ScriptedSampler(),
        None,
        ScriptedEncoder(),
        _task(),
        RECORDS[3:],
        batch_size=1,
        key=jax.random.key(0),
        max_new=4,
    )
    assert "faithfulness" not in res and "image_faithful" not in res["responses"][0]


def test_report_entry_and_tables_hold_the_rates():
    greedy = _evaluate() | {"coherence": 1.0, "consistency": 1.0}
    entry = eval_report.summarize(LABELS, greedy, _evaluate(n=2))
    assert entry["greedy"]["image_faithful"] == pytest.approx(2 / 3)
    assert entry["sampled"]["answer_coherent"] == pytest.approx(2 / 3)
    assert entry["per_class"]["awe"] == {"count": 2, "accuracy": 1.0, "image_faithful": 0.5, "answer_coherent": 1.0}
    assert entry["per_class"]["sadness"] == {"count": 1, "accuracy": 0.0}  # no truth: absent, not 0
    md = eval_report.markdown(
        {
            "checkpoint": "/runs/x",
            "use_set": True,
            "samples": 2,
            "sampled_temperature": 0.6,
            "sampled_top_p": 0.95,
            "max_response_len": 4,
            "datasets": {"mini": entry},
        }
    )
    assert "| image-faithful | answer-coherent |" in md
    assert "| 0.667 | 0.667 |" in md  # the summary row's last two cells
    assert "| label | n | greedy acc | image_faithful | answer_coherent |" in md
    assert "| awe | 2 | 1.000 | 0.500 | 1.000 |" in md and "| sadness | 1 | 0.000 | – | – |" in md
