"""Teaching the tiny judge: the cold-start batch holds reflection questions in the configured
share (text ones without pixels, image ones with), each answered with its target, and the rest
SET answers; the judge's held-out accuracy is measured and logged after the cold start."""

import json
import os

import numpy as np
import pytest
from test_train import small_config

from emor3_jax import trainer
from emor3_jax.data import store
from emor3_jax.runtime import multihost

TEXT_Q = "Which emotion best describes the text above?"
IMAGE_Q = "Can the following text describe the image?"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    c = small_config(
        tmp_path_factory.mktemp("judge"), **{"cold_start.batch_size": 8, "cold_start.reflection_share": 0.5}
    )
    r = trainer.Run(c)
    yield r
    r.close()


def _rows(r, step):
    records = multihost.gather_records(next(store.train_iterator(r.data_dir, "cold_start", 8, 0)))
    batch, loss_mask = r._sft_batch(records, step)
    ids, mask = np.asarray(batch.input_ids), np.asarray(loss_mask) > 0
    tok = r.encoder.tok
    rows = []
    for row, m in zip(ids, mask):
        prompt = tok.decode(row.tolist(), skip_special_tokens=True)
        answer = tok.decode(row[1:][m].tolist(), skip_special_tokens=True).strip()
        rows.append((prompt, answer))
    return records, batch, rows


def test_batch_holds_the_reflection_share_then_set_answers(run):
    records, batch, rows = _rows(run, step=1)
    # share 0.5 of 8 rows: records 0-3 as reflection questions, of kinds (i + step) % 4 =
    # 1 text_feeling, 2 image_true, 3 image wrong, 0 text; records 4-7 as SET answers.
    kinds = [TEXT_Q, IMAGE_Q, IMAGE_Q, TEXT_Q]
    for (prompt, answer), q in zip(rows[:4], kinds):
        assert q in prompt and "<step1>" in prompt and "\\boxed" not in answer
    assert rows[1][1] == "yes" and rows[2][1] == "no"
    assert rows[3][1] == records[3]["label"]  # the text's feeling is the record's own label
    labels = run.c.data.labels
    assert rows[0][1] in labels and rows[0][1] != records[0]["label"]  # another label's feeling
    for (prompt, answer), rec in zip(rows[4:], records[4:]):
        assert TEXT_Q not in prompt and IMAGE_Q not in prompt and answer == rec["answer"].strip()
    # Image tokens in the 2 image questions and the 4 SET prompts, none in the text questions.
    has_image = (np.asarray(batch.input_ids) == run.rt.cfg.image_token_id).any(axis=1)
    assert has_image.tolist() == [False, True, True, False, True, True, True, True]


def test_the_kinds_rotate_with_the_step(run):
    _, _, rows = _rows(run, step=2)
    assert [TEXT_Q in p for p, _ in rows[:4]] == [False, False, True, True]  # kinds 2, 3, 0, 1


def test_judge_accuracy_is_measured_and_logged(run):
    run.c.unlock()
    run.c.cold_start.judge_records = 2
    out = run.judge_check(step=7)
    assert 0 <= out["judge_accuracy"] <= 1 and 0 <= out["judge_text"] <= 1 and 0 <= out["judge_image"] <= 1
    # 2 records -> 8 questions: 4 text, 4 image; overall is their mean.
    assert out["judge_accuracy"] == pytest.approx((out["judge_text"] + out["judge_image"]) / 2)
    with open(os.path.join(run.c.workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if '"phase": "judge"' in line]
    assert logged[-1]["step"] == 7 and logged[-1]["judge_accuracy"] == pytest.approx(out["judge_accuracy"])
