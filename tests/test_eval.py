"""The evaluation: report pieces on hand-worked numbers, the heatmap, the CLI end to end on a
tiny run, and clear errors for a bad checkpoint or data set."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs.qwen_vl import get_config
from emor3_jax import config_lib, trainer
from emor3_jax.core import sharding
from emor3_jax.evaluation import report as eval_report
from emor3_jax.load import load_policy, locate

# pytest-xdist (-n 2 --dist loadfile) runs a file's tests on one worker: they share the
# module's tiny_run, built once.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ("awe", "fear", "joy")
# 6 greedy answers: awe right, awe->fear (case differs), fear right, joy unboxed, joy right,
# joy->"sadness" (not a label of this set: unparsed).
TRUE = ["awe", "awe", "fear", "joy", "joy", "joy"]
PRED = ["awe", "Fear", "fear", "None", "joy", "sadness"]


def test_confusion_matrix_and_per_class_accuracy_by_hand():
    counts = eval_report.confusion_matrix(TRUE, PRED, LABELS)
    #            awe fear joy unparsed
    assert counts == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2]]
    per = eval_report.per_class_accuracy(counts, LABELS)
    # joy is 1/3, not 1/1: the unparsed answers count against it.
    assert per == {
        "awe": {"count": 2, "accuracy": 0.5},
        "fear": {"count": 1, "accuracy": 1.0},
        "joy": {"count": 3, "accuracy": pytest.approx(1 / 3)},
    }
    empty = eval_report.per_class_accuracy([[0, 0, 0, 0], *counts[1:]], LABELS)
    assert empty["awe"] == {"count": 0, "accuracy": None}
    with pytest.raises(ValueError, match="'anger' is not one of"):
        eval_report.confusion_matrix(["anger"], ["awe"], LABELS)


def _fake_results():
    greedy_rows = [{"label": t, "prediction": p} for t, p in zip(TRUE, PRED)]
    greedy = {
        "accuracy": 0.5,
        "format_rate": 1.0,
        "response_length": 12.5,
        "coherence": 0.75,
        "consistency": 0.25,
        "responses": greedy_rows,
    }
    sampled = {"run_accuracies": [0.5, 0.0], "format_rate": 0.5, "response_length": 10.0}
    entry = eval_report.summarize(LABELS, greedy, sampled)
    return {
        "checkpoint": "/runs/x",
        "use_set": True,
        "samples": 2,
        "sampled_temperature": 0.6,
        "sampled_top_p": 0.95,
        "max_response_len": 48,
        "datasets": {"mini": entry},
    }


def test_summary_and_markdown_tables():
    results = _fake_results()
    entry = results["datasets"]["mini"]
    # population std of [0.5, 0.0] is 0.25 (the unbiased one would be 0.354).
    assert entry["sampled"]["accuracy_mean"] == 0.25 and entry["sampled"]["accuracy_std"] == 0.25
    assert entry["confusion"]["columns"] == ["awe", "fear", "joy", "unparsed"]
    md = eval_report.markdown(results)
    assert "| mini | 6 | 0.500 | 0.250 ± 0.250 | 1.000 | 0.750 | 0.250 | 12.5 |" in md
    assert "| awe | 2 | 0.500 |" in md and "| joy | 3 | 0.333 |" in md
    assert "| label \\ prediction | awe | fear | joy | unparsed |" in md
    assert "| joy | 0 | 0 | 1 | 2 |" in md
    assert "T=0.6, top_p=0.95" in md


def test_confusion_png_is_a_readable_heatmap(tmp_path):
    counts = eval_report.confusion_matrix(TRUE, PRED, LABELS)
    path = tmp_path / "c.png"
    eval_report.confusion_image(counts, LABELS, "mini").save(path)
    with Image.open(path) as im:
        im.verify()
    im = Image.open(path).convert("RGB")
    w, h = im.size
    cell = eval_report.CELL
    assert w > cell * (len(LABELS) + 1) and h > cell * len(LABELS)
    # The grid ends _PAD pixels above the bottom edge; the fear row (all its answers in one
    # cell) is darker there than its empty awe cell.
    grid_left = w - 8 - cell * (len(LABELS) + 1)
    fear_y = h - 8 - 2 * cell + 4
    full = np.asarray(im.getpixel((grid_left + cell + 4, fear_y)))
    empty = np.asarray(im.getpixel((grid_left + 4, fear_y)))
    assert full.sum() < 200 and empty.sum() == 3 * 255


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A workdir trained for one cold-start step on a few synthetic images."""
    workdir = tmp_path_factory.mktemp("run")
    c = get_config("tiny")
    c.workdir = str(workdir)
    c.cold_start.steps, c.cold_start.batch_size, c.cold_start.warmup_steps = 1, 2, 0
    c.rl.steps = c.rl.epochs = 0
    c.eval.num_examples, c.eval.batch_size = 1, 1
    c.data.synthetic_train, c.data.synthetic_test = 4, 4
    c.rl.max_response_len, c.sampling.gen_buckets = 8, (8,)
    c.cold_start.judge_records = 0  # the judge answers up to 32 tokens, past the 8-token bucket
    c.cold_start.judge_batch_size = 0  # judge teaching: tests/test_judge_cold_start.py
    c.checkpoint.async_save = False
    trainer.run(c)
    return str(workdir)


def test_cli_end_to_end_on_a_tiny_run(tiny_run, tmp_path):
    out = tmp_path / "eval"
    k = 2
    cmd = [
        sys.executable,
        "-m",
        "emor3_jax.eval",
        f"--config={ROOT}/configs/qwen_vl.py",
        f"--checkpoint={tiny_run}",
        f"--out={out}",
        f"--samples={k}",
        "--config.eval.num_examples=3",
        "--config.eval.batch_size=2",
        "--config.rl.max_response_len=8",
        "--config.sampling.gen_buckets=(8,)",
        "--config.reward.compat=emo_r3_code",  # asks the judge even without a step span
    ]
    # one CPU device, as the command runs on a CPU; -O0 as conftest.py says
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_backend_optimization_level=0")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "| test | 3 |" in done.stdout
    for name in ("results.json", "results.md", "test_confusion.png", "test_responses.jsonl"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 1 and results["samples"] == k and results["use_set"] is True
    entry = results["datasets"]["test"]
    assert set(entry) == {"num_examples", "labels", "greedy", "sampled", "per_class", "confusion"}
    faithful = {"image_faithful", "answer_coherent"}  # the synthetic test split carries a truth
    assert set(entry["greedy"]) == {"accuracy", "format_rate", "response_length", "coherence", "consistency"} | faithful
    assert faithful <= set(entry["sampled"]) and all(
        faithful <= set(v) for v in entry["per_class"].values() if v["count"]
    )
    assert len(entry["sampled"]["run_accuracies"]) == k
    lines = [json.loads(x) for x in (out / "test_responses.jsonl").read_text().splitlines()]
    assert len(lines) == entry["num_examples"] == 3
    assert entry["greedy"]["accuracy"] == pytest.approx(np.mean([x["correct"] for x in lines]))
    assert entry["greedy"]["format_rate"] == pytest.approx(np.mean([x["format"] for x in lines]))
    for x in lines:
        assert {"id", "label", "prediction", "correct", "format", "response", "text_answer", "image_answer"} <= set(x)
        assert len(x["sampled"]) == k
        assert isinstance(x["text_answer"], str) and isinstance(x["image_answer"], str)
        assert all(isinstance(r[k], bool) for r in [x, *x["sampled"]] for k in faithful)
    assert entry["greedy"]["image_faithful"] == pytest.approx(np.mean([x["image_faithful"] for x in lines]))
    assert entry["greedy"]["answer_coherent"] == pytest.approx(np.mean([x["answer_coherent"] for x in lines]))
    assert "| image-faithful | answer-coherent |" in (out / "results.md").read_text()
    assert sum(map(sum, entry["confusion"]["counts"])) == 3
    sampled_correct = [s["correct"] for x in lines for s in x["sampled"]]
    assert entry["sampled"]["accuracy_mean"] == pytest.approx(np.mean(sampled_correct))


def _mesh():
    return sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])


def test_missing_or_foreign_checkpoint_is_refused_clearly(tmp_path):
    c = get_config("tiny")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither a Hugging Face checkpoint dir"):
        locate(str(tmp_path))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="this is not a Qwen2.5-VL checkpoint"):
        load_policy(str(llama), c, _mesh(), sharding.DEFAULT_RULES)


def test_hf_checkpoint_with_a_foreign_tokenizer_is_refused(hf_tiny_dir, tiny_run):
    """The parity fixture's ids (vocab 400, <|image_pad|> 390) do not fit the run's tokenizer."""
    c = get_config("tiny")
    c.tokenizer_path = os.path.join(tiny_run, "tokenizer")
    with pytest.raises(ValueError, match="tokenizer does not match the checkpoint"):
        load_policy(hf_tiny_dir, c, _mesh(), sharding.DEFAULT_RULES)


def test_bad_data_set_settings_name_the_flag():
    c = get_config("tiny")
    with pytest.raises(ValueError) as err:
        config_lib.validate_eval(c, ["emotion6", "fi"], 0)
    msg = str(err.value)
    assert "--config.eval.datasets.emotion6.path=''" in msg
    assert "--config.eval.datasets.emotion6.annotations=''" in msg
    assert "no data set 'fi'" in msg and "--samples=0" in msg
    config_lib.validate_eval(c, ["test"], 2)
