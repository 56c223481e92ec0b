"""Cold-start data (data.cold_start): SET-formatted answers read from JSONL or a JSON array with
image files or parquet with image bytes, flat or as ShareGPT-style conversations, built into
their own split that the cold start trains on; records without a SET response stop the build
naming the field and the record."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from configs.qwen_vl import get_config
from emor3_jax import config_lib
from emor3_jax.data import pipeline, sources, store
from emor3_jax.emo_r3.rewards import format_score

LABELS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20 + i, 16), (30 * i % 256, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def set_response(label: str, i: int) -> str:
    return (
        f"<step1>a scene number {i}</step1><step2>it feels like {label}</step2>"
        f"<step3>valence and arousal of {label}</step3>\\boxed{{{label}}}"
    )


def write_jsonl(folder, rows: list[dict]) -> str:
    """rows' `image` are bytes: written to folder/img/<i>.png and named relative to the file."""
    (folder / "img").mkdir(parents=True)
    lines = []
    for i, row in enumerate(rows):
        (folder / "img" / f"{i}.png").write_bytes(row["image"])
        lines.append(json.dumps({**row, "image": f"img/{i}.png"}))
    path = folder / "cold.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_parquet(path, rows: list[dict], images_column: bool = False) -> str:
    """rows' `image` as bytes (`image` column), or as the HF layout list<struct<bytes, path>>."""
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "image"}
    if images_column:
        t = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        columns["images"] = pa.array([[{"bytes": r["image"], "path": None}] for r in rows], type=t)
    else:
        columns["image"] = pa.array([r["image"] for r in rows], type=pa.binary())
    pq.write_table(pa.table(columns), path)
    return str(path)


def cold_rows(n: int) -> list[dict]:
    return [
        {"image": png(i), "problem": f"<image>Which emotion does image {i} evoke?", "response": set_response(label, i)}
        for i, label in ((i, LABELS[i % 8]) for i in range(n))
    ]


def test_jsonl_with_image_files(tmp_path):
    rows = cold_rows(3)
    rows[1] = {"image": rows[1]["image"], "question": "<image>What is felt?", "response": rows[1]["response"]}
    records = list(sources.read_cold_start(write_jsonl(tmp_path, rows), LABELS))
    assert [r["id"] for r in records] == ["cold-0", "cold-1", "cold-2"]
    assert [r["label"] for r in records] == LABELS[:3]  # from the response's \boxed{}
    assert [r["answer"] for r in records] == [r["response"] for r in rows]
    assert records[1]["problem"] == "<image>What is felt?" and records[0]["problem"] == rows[0]["problem"]
    assert [r["image"] for r in records] == [r["image"] for r in rows]  # the files' bytes unchanged
    assert all(format_score(r["answer"]) == 1.0 and r["truth"] == "" for r in records)


@pytest.mark.parametrize("images_column", [False, True])
def test_parquet_with_image_bytes(tmp_path, images_column):
    rows = cold_rows(4)
    rows[2]["label"] = "Fear"  # an explicit label wins over the box
    rows[2]["id"] = "x2"
    for r in rows:
        r.setdefault("label", None)
        r.setdefault("id", None)
    records = list(sources.read_cold_start(write_parquet(tmp_path / "c.parquet", rows, images_column), LABELS))
    assert [r["id"] for r in records] == ["c-0", "c-1", "x2", "c-3"]
    assert [r["label"] for r in records] == ["amusement", "anger", "fear", "contentment"]
    assert [r["image"] for r in records] == [r["image"] for r in rows]


def test_a_record_without_a_response_stops_naming_the_field_and_the_record(tmp_path):
    rows = cold_rows(3)
    del rows[1]["response"]
    records = sources.read_cold_start(write_jsonl(tmp_path / "j", rows), LABELS)
    with pytest.raises(ValueError, match=r"cold\.jsonl line 2 \(id cold-1\).*no field 'response'"):
        list(sources.checked(records, skip_bad=True, max_bad_fraction=0.9, counter={}))  # never skipped

    rows = cold_rows(2)
    no_response = write_parquet(tmp_path / "p.parquet", [{k: v for k, v in r.items() if k != "response"} for r in rows])
    with pytest.raises(ValueError, match=r"p\.parquet: cold-start data has no field 'response'"):
        sources.read_cold_start(no_response, LABELS)


def test_a_bare_label_response_stops_the_build_naming_response_and_the_record(tmp_path):
    rows = cold_rows(6)
    rows[4]["response"] = "\\boxed{amusement}"  # a bare label: no SET steps
    c = _config(tmp_path, write_parquet(tmp_path / "c.parquet", rows))
    with pytest.raises(ValueError, match=r"record 'c-4': field 'response' is not a SET answer"):
        store.build(c, is_set_answer=format_score)


def test_bad_image_path_and_unknown_label_are_bad_records(tmp_path):
    rows = cold_rows(2)
    rows[1]["response"] = set_response("joy", 1)  # not one of LABELS
    path = write_jsonl(tmp_path, rows)
    with pytest.raises(sources.BadRecord, match=r"line 2 \(id cold-1\): label 'joy' is not one of"):
        list(sources.read_cold_start(path, LABELS))
    (tmp_path / "escape.jsonl").write_text(json.dumps({"image": "../x.png", "response": set_response("awe", 0)}))
    with pytest.raises(sources.BadRecord, match="outside the data root"):
        list(sources.read_cold_start(tmp_path / "escape.jsonl", LABELS))


def _config(tmp_path, cold_start: str):
    c = get_config("tiny")
    c.workdir = str(tmp_path / "run")
    c.data.synthetic_train, c.data.synthetic_test = 8, 4
    c.data.cold_start = cold_start
    c.cold_start.judge_batch_size = 0  # the reflection questions need the synthetic truth
    return c


def test_the_cold_start_split_is_built_from_data_cold_start_and_train_stays_grpos(tmp_path):
    rows = cold_rows(5)
    c = _config(tmp_path, write_jsonl(tmp_path / "cold", rows))
    config_lib.validate(c)
    out, counts = store.build(c, is_set_answer=format_score)
    assert store.cold_start_split(c) == "cold_start" and counts["cold_start"] == {"seen": 5, "bad": 0}
    cold = pipeline.open_split(out, store.NAME, "cold_start")
    assert sorted(cold[i]["answer"] for i in range(len(cold))) == sorted(r["response"] for r in rows)
    assert len(pipeline.open_split(out, store.NAME, "train")) == 8  # GRPO's split as before
    it = store.train_iterator(out, "cold_start", 5, 0, split=store.cold_start_split(c))
    assert sorted(r["id"] for r in next(it)) == [f"cold-{i}" for i in range(5)]

    c.data.cold_start = ""
    assert store.cold_start_split(c) == "train"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.cold_start": "/no/such/cold.jsonl"}, "--config.data.cold_start='/no/such/cold.jsonl' must be"),
        ({"data.cold_start": "{dir}/c.jsonl", "cold_start.steps": 0}, "but --config.cold_start.steps=0"),
        (
            {"data.cold_start": "{dir}/c.jsonl", "cold_start.judge_batch_size": 4},
            "--config.cold_start.judge_batch_size=4 must be",
        ),
    ],
)
def test_bad_cold_start_settings_are_refused_naming_the_flag(tmp_path, overrides, message):
    (tmp_path / "c.jsonl").write_text("")
    c = _config(tmp_path, "")
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value.format(dir=tmp_path) if isinstance(value, str) else value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(c)


def _write_images(folder, rows: list[dict]) -> list[str]:
    """rows' `image` bytes written to folder/img/<i>.png; their paths relative to folder."""
    (folder / "img").mkdir(parents=True)
    for i, row in enumerate(rows):
        (folder / "img" / f"{i}.png").write_bytes(row["image"])
    return [f"img/{i}.png" for i in range(len(rows))]


def test_a_json_array_of_records(tmp_path):
    rows = cold_rows(3)
    names = _write_images(tmp_path, rows)
    (tmp_path / "cold.json").write_text(json.dumps([{**r, "image": n} for r, n in zip(rows, names)], indent=1))
    records = list(sources.read_cold_start(tmp_path / "cold.json", LABELS))
    assert [r["id"] for r in records] == ["cold-0", "cold-1", "cold-2"]
    assert [(r["image"], r["answer"], r["problem"]) for r in records] == [
        (r["image"], r["response"], r["problem"]) for r in rows
    ]
    config_lib.validate(_config(tmp_path, str(tmp_path / "cold.json")))  # the flag takes .json
    (tmp_path / "object.json").write_text(json.dumps({"data": rows[:1]}, default=str))
    with pytest.raises(ValueError, match=r"object\.json: expected a JSON array of records, got a dict"):
        list(sources.read_cold_start(tmp_path / "object.json", LABELS))


def _sharegpt(rows, names, style: str) -> list[dict]:
    """LLaMA-Factory's two spellings of a conversation, and content as a list of parts."""
    out = []
    for r, n in zip(rows, names):
        if style == "openai":
            turns = [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["response"]}]
            out.append({"messages": turns, "images": [n]})
        elif style == "sharegpt":
            turns = [{"from": "human", "value": r["problem"]}, {"from": "gpt", "value": r["response"]}]
            out.append({"conversations": turns, "images": [n]})
        else:  # parts: the image part stands where "<image>" stood
            parts = [{"type": "image"}, {"type": "text", "text": r["problem"].removeprefix("<image>")}]
            turns = [{"role": "user", "content": parts}, {"role": "assistant", "content": r["response"]}]
            out.append({"messages": turns, "images": [n]})
    return out


@pytest.mark.parametrize("style", ["openai", "sharegpt", "parts"])
@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_sharegpt_style_messages_give_the_image_the_user_turn_and_the_set_answer(tmp_path, style, container):
    rows = cold_rows(3)
    records = _sharegpt(rows, _write_images(tmp_path, rows), style)
    path = tmp_path / f"cold.{container}"
    path.write_text(json.dumps(records) if container == "json" else "\n".join(map(json.dumps, records)))
    got = list(sources.read_cold_start(path, LABELS))
    assert [r["problem"] for r in got] == [r["problem"] for r in rows]  # "<image>Which emotion does image i evoke?"
    assert [r["answer"] for r in got] == [r["response"] for r in rows]
    assert [r["image"] for r in got] == [r["image"] for r in rows]
    assert [r["label"] for r in got] == LABELS[:3]


def test_sharegpt_records_in_parquet(tmp_path):
    rows = cold_rows(2)
    t = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    turns = [[{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["response"]}] for r in rows]
    images = pa.array(
        [[{"bytes": r["image"], "path": None}] for r in rows],
        pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    )
    pq.write_table(pa.table({"messages": pa.array(turns, t), "images": images}), tmp_path / "m.parquet")
    got = list(sources.read_cold_start(tmp_path / "m.parquet", LABELS))
    assert [(r["answer"], r["image"]) for r in got] == [(r["response"], r["image"]) for r in rows]


def test_sharegpt_field_errors_name_the_field_and_the_record(tmp_path):
    rows = cold_rows(5)
    records = _sharegpt(rows, _write_images(tmp_path, rows), "openai")
    records[0]["messages"] = records[0]["messages"][:1]  # no assistant turn: no SET answer
    del records[1]["images"]
    records[2]["messages"].insert(0, {"role": "system", "content": "You are helpful."})
    records[3]["messages"][0]["content"] = "<image><image>Which?"
    records[4]["messages"][1]["role"] = "bot"
    (tmp_path / "bad.json").write_text(json.dumps(records))
    it = sources.read_cold_start(tmp_path / "bad.json", LABELS)
    with pytest.raises(ValueError, match=r"bad\.json record 0 \(id bad-0\).*no field 'response' \(no assistant turn"):
        next(it)  # never skipped: a cold start must not train on bare labels
    for message in (
        r"record 1 \(id bad-1\): missing required field 'image' \(or 'images'\)",
        r"record 2 \(id bad-2\): a system turn is not used",
        r"record 3 \(id bad-3\): the user turn has 2 <image> placeholders",
        r"record 4 \(id bad-4\): turn 1 has role 'bot'",
    ):
        with pytest.raises(sources.BadRecord, match=message):
            next(it)
