"""The held-out evaluator's pieces on hand-worked values: the rows of a batch of responses, the
summary of one setting, the trainer's metrics and eval's response lines of a greedy and a
sampled result, and `heldout`'s batches, keys and settings (a scripted sampler records them)."""

import dataclasses

import jax
import numpy as np
import pytest

from configs.qwen_vl import get_config
from emor3_jax.core.batches import Prompt
from emor3_jax.evaluation.evaluate import (
    HeldOutSettings,
    ResponseRows,
    heldout,
    heldout_metrics,
    response_lines,
    response_rows,
    summarize_rows,
)
from emor3_jax.sampling.methods import GREEDY, SamplingParams
from emor3_jax.sampling.rollout import Rollouts
from emor3_jax.sampling.sampler import Samples


@dataclasses.dataclass(frozen=True)
class ScriptedTask:
    """A response "<words> box:<answer>" answers <answer>; correct when it is the label, in format
    when boxed. Reflecting, coherence is 1 when the text answer is "yes"; the response "crash"
    fails to score. A record's "truth" word in the response makes it image-faithful."""

    reflects: bool = False
    reflect_keys: list = dataclasses.field(default_factory=list)

    def prompt(self, encoder, record):
        return Prompt(np.array([int(record["id"])], np.int32))

    def reflect(self, sampler, judge, encoder, ro, *, key):
        self.reflect_keys.append(jax.random.key_data(key).tolist())
        ro.text_answers, ro.image_answers = ["yes"] * len(ro.responses), ["no"] * len(ro.responses)

    def answer(self, response):
        return response.rsplit("box:", 1)[1] if "box:" in response else "None"

    def score(self, response, label, text_answer, image_answer):
        if response == "crash":
            return {"overall": 0.0, "accuracy": 0.0, "format": 0.0, "coherence": 0.0, "error": "ValueError: crash"}
        s = {"overall": 0.0, "accuracy": float(self.answer(response) == label), "format": float("box:" in response)}
        if self.reflects:
            s["coherence"] = float(text_answer == "yes")
        return s

    def faithfulness(self, response, record):
        if "truth" not in record:
            return None
        return {"image_faithful": record["truth"] in response, "answer_coherent": True}

    def faithfulness_rates(self, true_labels, flags):
        return {"count": len(flags), "labels": list(true_labels)}


def _rollouts(responses, lengths, n, text=None, image=None):
    r = len(responses)
    return Rollouts([], [], n, np.zeros((r, 1), np.int32), np.array(lengths), None, responses, text, image)


RECORDS = [{"id": "0", "label": "awe", "truth": "sky"}, {"id": "1", "label": "fear"}]


def test_response_rows_by_hand():
    # n = 2; rows 4 and 5 answer a padding record and are dropped.
    ro = _rollouts(["sky box:awe", "sea", "box:Fear", "crash", "box:awe", "box:awe"], [3, 1, 2, 5, 9, 9], 2)
    ro.text_answers, ro.image_answers = ["yes", "no", "yes", None, "yes", "yes"], ["no", None, "yes", "no", "no", "no"]
    got = response_rows(ScriptedTask(reflects=True), RECORDS, ro)
    base = [
        dict(
            id="0", label="awe", sample=0, response="sky box:awe", prediction="awe", correct=True, format=True, length=3
        ),
        dict(id="0", label="awe", sample=1, response="sea", prediction="None", correct=False, format=False, length=1),
        # "Fear" is not "fear": this task compares exactly
        dict(
            id="1", label="fear", sample=0, response="box:Fear", prediction="Fear", correct=False, format=True, length=2
        ),
        dict(
            id="1", label="fear", sample=1, response="crash", prediction="None", correct=False, format=False, length=5
        ),
    ]
    flags = [dict(image_faithful=True, answer_coherent=True), dict(image_faithful=False, answer_coherent=True), {}, {}]
    judged = [
        dict(text_answer="yes", image_answer="no", coherence=1.0),
        dict(text_answer="no", image_answer=None, coherence=0.0),
        dict(text_answer="yes", image_answer="yes", coherence=1.0),
        dict(text_answer=None, image_answer="no", coherence=0.0, score_error="ValueError: crash"),
    ]
    want = [{**b, **f, **j} for b, f, j in zip(base, flags, judged)]
    assert got.rows == want
    assert [list(r) for r in got.rows] == [list(r) for r in want]  # the key order results files keep
    assert got.faithful == want[:2] and got.judged == ["coherence"]

    plain = response_rows(ScriptedTask(), RECORDS[1:], _rollouts(["box:fear"], [4], 1))
    assert plain.rows == [dict(base[2], sample=0, response="box:fear", prediction="fear", correct=True, length=4)]
    assert plain.faithful == [] and plain.judged == []  # no truth, no reflection


def _row(correct, fmt, length, coherence):
    return {"label": "awe", "correct": correct, "format": fmt, "length": length, "coherence": coherence}


def test_summarize_rows_by_hand():
    rows = [_row(True, True, 2, 1.0), _row(False, True, 4, 0.0), _row(True, False, 6, 0.0), _row(True, True, 8, 1.0)]
    out = summarize_rows(ScriptedTask(), ResponseRows(rows, rows[:2], ["coherence"]), 2)
    assert list(out) == [
        "accuracy",
        "run_accuracies",
        "format_rate",
        "response_length",
        "responses",
        "coherence",
        "faithfulness",
    ]
    assert out["accuracy"] == 0.75 and out["format_rate"] == 0.75 and out["response_length"] == 5.0
    # run j holds rows j, j + 2: run 0 is rows 0 and 2 (both right), run 1 rows 1 and 3 (one right).
    # Consecutive pairs (rows 0-1, 2-3) would give [0.5, 1.0].
    assert out["run_accuracies"] == [1.0, 0.5]
    assert out["coherence"] == 0.5 and out["responses"] is rows
    assert out["faithfulness"] == {"count": 2, "labels": ["awe", "awe"]}  # only the rows with flags
    assert "faithfulness" not in summarize_rows(ScriptedTask(), ResponseRows(rows), 1)


def test_heldout_metrics_by_hand():
    greedy = {
        "accuracy": 0.5,
        "format_rate": 1.0,
        "response_length": 7.0,
        "faithfulness": {"image_faithful": 0.25, "count": 4, "answer_coherent": 0.75, "per_class": {}},
    }
    sampled = {"accuracy": 0.25, "format_rate": 0.5, "response_length": 3.5, "coherence": 1.0}
    assert list(heldout_metrics(greedy, sampled).items()) == [
        ("greedy_accuracy", 0.5),
        ("greedy_format", 1.0),
        ("greedy_length", 7.0),
        ("greedy_image_faithful", 0.25),
        ("greedy_answer_coherent", 0.75),
        ("sampled_accuracy", 0.25),
        ("sampled_format", 0.5),
        ("sampled_length", 3.5),
    ]


def test_response_lines_by_hand():
    greedy = {"responses": [{"id": "0", "response": "g0"}, {"id": "1", "response": "g1"}]}
    sampled = {
        "responses": [
            dict(id="0", sample=s, response=f"s0{s}", prediction="awe", correct=True, format=True, length=s)
            for s in range(2)
        ]
        + [
            dict(id="1", sample=s, response=f"s1{s}", prediction="None", correct=False, format=False, length=5)
            | {"image_faithful": False, "answer_coherent": True}
            for s in range(2)
        ]
    }
    keep = lambda r: {k: r[k] for k in r if k not in ("id", "sample")}
    lines = response_lines(greedy, sampled, 2)
    assert lines == [
        {"id": "0", "response": "g0", "sampled": [keep(r) for r in sampled["responses"][:2]]},
        {"id": "1", "response": "g1", "sampled": [keep(r) for r in sampled["responses"][2:]]},
    ]
    assert list(lines[1]["sampled"][0]) == [
        "response",
        "prediction",
        "correct",
        "format",
        "length",
        "image_faithful",
        "answer_coherent",
    ]


class RecordingSampler:
    """Answers record i with "box:awe" and records each call's prompts, n, params and key."""

    def __init__(self):
        self.calls = []

    def generate(self, model, prompts, *, key, max_new_tokens, n, params):
        self.calls.append(([int(p.ids[0]) for p in prompts], n, params, jax.random.key_data(key).tolist()))
        rows = len(prompts) * n
        ids = np.repeat([p.ids[0] for p in prompts], n)[:, None]
        ones = jax.numpy.ones((rows,), np.int32)
        return Samples(jax.numpy.asarray(ids), jax.numpy.zeros((rows, 1)), ones, ones.astype(bool))


class Decoder:
    def decode(self, tokens, lengths):
        return ["box:awe" for _ in tokens]


def test_heldout_batches_keys_and_settings():
    records = [{"id": str(i), "label": "awe"} for i in range(3)]
    sampler, task = RecordingSampler(), ScriptedTask()
    sampled_params = SamplingParams(temperature=0.6, top_p=0.95)
    settings = HeldOutSettings(max_new=4, batch_size=2, sampled=sampled_params, samples=2, judge_greedy=True)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    seen = []
    greedy, sampled = heldout(sampler, None, Decoder(), task, records, settings, (k0, k1), lambda *a: seen.append(a))
    data = lambda k, i: jax.random.key_data(jax.random.fold_in(k, i)).tolist()
    assert sampler.calls == [
        # greedy: batches of 2 prompts (the last padded with its first record), keyed by the
        # batch's first record index
        ([0, 1], 1, GREEDY, data(k0, 0)),
        ([2, 2], 1, GREEDY, data(k0, 2)),
        # sampled: 2 // 2 = 1 prompt per batch, 2 samples each
        ([0], 2, sampled_params, data(k1, 0)),
        ([1], 2, sampled_params, data(k1, 1)),
        ([2], 2, sampled_params, data(k1, 2)),
    ]
    # the policy judged its greedy answers only, each batch with fold_in(batch key, 1)
    batch_keys = [jax.random.fold_in(k0, i) for i in (0, 2)]
    assert task.reflect_keys == [jax.random.key_data(jax.random.fold_in(k, 1)).tolist() for k in batch_keys]
    assert greedy["coherence"] == 1.0 and "text_answer" in greedy["responses"][0]
    assert "coherence" not in sampled and len(sampled["responses"]) == 6 and sampled["run_accuracies"] == [1.0, 1.0]
    assert seen == [("greedy", greedy), ("sampled", sampled)]


def test_heldout_settings_from_config():
    c = get_config("tiny")
    s = HeldOutSettings.from_config(c, samples=4, judge_greedy=True)
    assert s == HeldOutSettings(
        max_new=c.rl.max_response_len,
        batch_size=c.eval.batch_size,
        sampled=SamplingParams(temperature=c.eval.sampled_temperature, top_p=c.eval.sampled_top_p),
        samples=4,
        judge_greedy=True,
    )
    assert HeldOutSettings.from_config(c).samples == 1 and not HeldOutSettings.from_config(c).judge_greedy


@pytest.mark.parametrize("samples, prompts_per_batch", [(1, 2), (4, 1)])
def test_sampled_batches_hold_about_batch_size_rows(samples, prompts_per_batch):
    sampler = RecordingSampler()
    settings = HeldOutSettings(max_new=4, batch_size=2, sampled=SamplingParams(), samples=samples)
    records = [{"id": str(i), "label": "awe"} for i in range(2)]
    heldout(sampler, None, Decoder(), ScriptedTask(), records, settings, (jax.random.key(0),) * 2)
    sampled_batches = [len(p) for p, _, params, _ in sampler.calls if params != GREEDY]
    assert sampled_batches == [prompts_per_batch] * (2 // prompts_per_batch)
