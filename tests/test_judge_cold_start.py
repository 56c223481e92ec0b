"""Teaching the tiny judge: each cold-start step adds a batch of its own of reflection questions
(text ones without pixels, image ones with), each answered with its target, about the step's
records; the SET batch stays whole; the judge's held-out accuracy is measured and logged after
the cold start."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import small_config

from emor3_jax import trainer
from emor3_jax.core import multihost
from emor3_jax.data import store
from emor3_jax.rl.learner import Learner
from emor3_jax.rl.sft import SFTSettings, SFTStep

# pytest-xdist (-n 2 --dist loadfile) runs a file's tests on one worker: they share the
# module's run, built once.

TEXT_Q = "Which emotion best describes the text above?"
IMAGE_Q = "Can the following text describe the image?"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    c = small_config(tmp_path_factory.mktemp("judge"), **{"cold_start.batch_size": 4, "cold_start.judge_batch_size": 8})
    r = trainer.Run.checked(c)
    yield r
    r.close()


def _step(r) -> SFTStep:
    """The run's cold-start step (its batches; the optimizer is never used here)."""
    settings = SFTSettings.from_config(r.c)
    return SFTStep(
        learner=Learner(r.graphdef, optax.sgd(0.0)),
        encoder=r.encoder,
        task=r.task,
        settings=settings,
        pad_id=r.rt.pad_id,
    )


def _decoded(r, batch, loss_mask):
    """(prompt, answer) of every row: the whole row, and the tokens the loss is taken on."""
    ids, mask = np.asarray(batch.input_ids), np.asarray(loss_mask) > 0
    tok = r.encoder.tok
    return [
        (tok.decode(row.tolist(), skip_special_tokens=True), tok.decode(row[1:][m].tolist(), skip_special_tokens=True))
        for row, m in zip(ids, mask)
    ]


def _records(r):
    return multihost.gather_records(next(store.train_iterator(r.data_dir, "cold_start", 4, 0)))


def test_the_set_batch_holds_every_record_as_a_set_answer(run):
    records = _records(run)
    rows = _decoded(run, *_step(run).set_batch(records))
    assert len(rows) == 4
    for (prompt, answer), rec in zip(rows, records):
        assert TEXT_Q not in prompt and IMAGE_Q not in prompt and answer.strip() == rec["answer"].strip()


def test_the_judge_batch_asks_each_record_every_kind_in_turn(run):
    records = _records(run)
    batch, loss_mask = _step(run).judge_batch(records, step=1)
    rows = _decoded(run, batch, loss_mask)
    assert len(rows) == 8  # cold_start.judge_batch_size, two questions per record of the 4
    # Question j: record j % 4, kind (j // 4 + j + step) % 4 (0 text, 1 text with another label's
    # feeling, 2 image matching, 3 image with a wrong detail).
    labels = run.c.data.labels
    for j, (prompt, answer) in enumerate(rows):
        rec, kind = records[j % 4], (j // 4 + j + 1) % 4
        answer = answer.strip()
        assert (TEXT_Q in prompt) == (kind < 2) and (IMAGE_Q in prompt) == (kind >= 2) and "<step1>" in prompt
        if kind == 0:
            assert answer == rec["label"]  # the text's feeling is the record's own label
        elif kind == 1:
            assert answer in labels and answer != rec["label"]  # another label's feeling
        else:
            assert answer == ("yes" if kind == 2 else "no")
    # Each record is asked two different kinds; image tokens in the image questions alone.
    assert {(j % 4, (j // 4 + j + 1) % 4) for j in range(8)} == {
        (r, k) for r in range(4) for k in ((r + 1) % 4, (r + 2) % 4)
    }
    has_image = (np.asarray(batch.input_ids) == run.rt.cfg.image_token_id).any(axis=1)
    assert has_image.tolist() == [(j // 4 + j + 1) % 4 >= 2 for j in range(8)]


def test_the_kinds_rotate_with_the_step(run):
    rows = _decoded(run, *_step(run).judge_batch(_records(run), step=2))
    assert [TEXT_Q in p for p, _ in rows[:4]] == [False, False, True, True]  # kinds 2, 3, 0, 1


def test_a_cold_start_step_adds_the_judge_loss_and_logs_it(run, monkeypatch):
    # The module's run is shared: the step trains a copy of its params and meta, in a config
    # changed for this test only (monkeypatch puts all three back). No warmup: the tiny
    # config's first step has learning rate 0 and would leave the params as they were.
    monkeypatch.setitem(run.c.cold_start, "steps", 1)
    monkeypatch.setitem(run.c.cold_start, "warmup_steps", 0)
    monkeypatch.setattr(run, "params", jax.tree.map(jnp.copy, run.params))  # the step donates them
    monkeypatch.setattr(run, "meta", copy.deepcopy(run.meta))
    before = jax.tree.map(np.asarray, run.params)
    run.cold_start()
    with open(os.path.join(run.c.workdir, "metrics.jsonl")) as f:
        step = [json.loads(line) for line in f if '"phase": "cold_start"' in line][-1]
    assert step["step"] == 1 and np.isfinite(step["judge_loss"]) and step["judge_loss"] > 0 and step["loss"] > 0
    assert run.params is not before
    # One AdamW step moves a parameter with a gradient by about the learning rate (1e-3).
    moved = max(
        float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(before))
    )
    assert moved > 5e-4, moved


def test_judge_accuracy_is_measured_and_logged(run, monkeypatch):
    monkeypatch.setitem(run.c.cold_start, "judge_records", 2)  # this test only
    out = run.judge_check(step=7)
    assert 0 <= out["judge_accuracy"] <= 1 and 0 <= out["judge_text"] <= 1 and 0 <= out["judge_image"] <= 1
    # 2 records -> 8 questions: 4 text, 4 image; overall is their mean.
    assert out["judge_accuracy"] == pytest.approx((out["judge_text"] + out["judge_image"]) / 2)
    # Per kind (2 questions each); the kind "text" does not overwrite the text questions' share.
    assert out["judge_text"] == pytest.approx((out["judge_kind_text"] + out["judge_kind_text_feeling"]) / 2)
    with open(os.path.join(run.c.workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if '"phase": "judge"' in line]
    assert logged[-1]["step"] == 7 and logged[-1]["judge_accuracy"] == pytest.approx(out["judge_accuracy"])
