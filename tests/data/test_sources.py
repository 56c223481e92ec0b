"""Tests for emor3_jax.data.sources: the three readers, each BadRecord case, and `checked`."""

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from emor3_jax.data import sources
from emor3_jax.data.sources import BadRecord, checked

LABELS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]


def png(i: int, fmt: str = "PNG") -> bytes:
    """A small distinct image: colour and a drawn box depend on i."""
    im = Image.new("RGB", (12 + i % 5, 9), (20 * i % 256, 255 - 7 * i % 256, 90))
    ImageDraw.Draw(im).rectangle([1, 1, 1 + i % 6, 4], fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def write_hf_parquet(path, rows):
    """HF `datasets` layout: images = list<struct<bytes, path>>, problem, answer, course_grained."""
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table(
        {
            "images": pa.array(
                [[{"bytes": r["image"], "path": None}] if r["image"] is not None else [] for r in rows], type=image_type
            ),
            "problem": [r["problem"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "course_grained": ["positive"] * len(rows),
        }
    )
    pq.write_table(table, path)


def parquet_rows(n, start=0):
    return [
        {"image": png(start + i), "problem": f"<image>Which emotion? {start + i}", "answer": LABELS[(start + i) % 8]}
        for i in range(n)
    ]


def test_read_emoset_parquet_file_and_dir(tmp_path):
    rows = parquet_rows(5)
    rows[1]["answer"] = "<answer> Awe </answer>"
    write_hf_parquet(tmp_path / "train-00000-of-00002.parquet", rows)
    write_hf_parquet(tmp_path / "train-00001-of-00002.parquet", parquet_rows(3, start=5))

    recs = list(sources.read_emoset_parquet(tmp_path / "train-00000-of-00002.parquet", LABELS))
    assert [r["id"] for r in recs] == [f"train-00000-of-00002-{i}" for i in range(5)]
    assert [r["image"] for r in recs] == [r["image"] for r in rows]
    assert recs[0] == {
        "id": "train-00000-of-00002-0",
        "image": rows[0]["image"],
        "label": "amusement",
        "problem": "<image>Which emotion? 0",
        "answer": "amusement",
        "truth": "",
    }
    assert recs[1]["label"] == "awe" and recs[1]["answer"] == "<answer> Awe </answer>"

    all_recs = list(sources.read_emoset_parquet(tmp_path, LABELS))
    assert len(all_recs) == 8 and all_recs[-1]["id"] == "train-00001-of-00002-2"
    assert all_recs[-1]["label"] == LABELS[7]


def test_parquet_missing_column_and_bad_rows(tmp_path):
    pq.write_table(pa.table({"problem": ["q"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: missing parquet columns \['images', 'answer'\]"):
        sources.read_emoset_parquet(tmp_path / "x.parquet", LABELS)

    rows = parquet_rows(4)
    rows[1]["image"] = b"\x89PNG\r\n\x1a\nnot really a png"
    rows[2]["answer"] = "joy"
    rows[3]["image"] = None  # an empty images list
    write_hf_parquet(tmp_path / "bad.parquet", rows)
    it = sources.read_emoset_parquet(tmp_path / "bad.parquet", LABELS)
    assert next(it)["id"] == "bad-0"
    with pytest.raises(BadRecord, match=r"bad\.parquet row 1 \(id bad-1\): image is not a readable image"):
        next(it)
    with pytest.raises(BadRecord, match=r"bad\.parquet row 2 \(id bad-2\): label 'joy' is not one of"):
        next(it)
    with pytest.raises(BadRecord, match=r"row 3 \(id bad-3\): expected `images` to hold exactly one image, got 0"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    for i in range(6):
        (root / "imgs" / f"{i}.png").write_bytes(png(i))
    (root / "imgs" / "5.jpg").write_bytes(png(5, "JPEG"))
    return root


def test_read_folder_jsonl(folder, tmp_path):
    ann = tmp_path / "ann.jsonl"
    lines = [
        {"image": "imgs/0.png", "label": "Fear"},
        {"image": "imgs/1.png", "label": "awe", "problem": "Q?", "answer": "awe", "id": "a1"},
        {"image": "imgs/5.jpg", "label": "sadness", "problem": None},
    ]
    ann.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = list(sources.read_folder(folder, ann, LABELS))
    assert recs == [
        {"id": "imgs/0.png", "image": png(0), "label": "fear", "problem": "", "answer": "", "truth": ""},
        {"id": "a1", "image": png(1), "label": "awe", "problem": "Q?", "answer": "awe", "truth": ""},
        {"id": "imgs/5.jpg", "image": png(5, "JPEG"), "label": "sadness", "problem": "", "answer": "", "truth": ""},
    ]


def test_read_folder_csv(folder, tmp_path):
    ann = tmp_path / "ann.csv"
    with open(ann, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "label", "problem"])
        w.writerow(["x0", "imgs/2.png", "anger", 'why, "really"?'])
        w.writerow(["", "imgs/3.png", "Contentment", ""])
    recs = list(sources.read_folder(folder, ann, LABELS))
    assert recs == [
        {"id": "x0", "image": png(2), "label": "anger", "problem": 'why, "really"?', "answer": "", "truth": ""},
        {"id": "imgs/3.png", "image": png(3), "label": "contentment", "problem": "", "answer": "", "truth": ""},
    ]

    bad = tmp_path / "bad.csv"
    bad.write_text("path,emotion\nimgs/2.png,anger\n")
    header_error = r"bad\.csv: CSV header \['path', 'emotion'\] lacks columns \['image', 'label'\]"
    with pytest.raises(ValueError, match=header_error):
        sources.read_folder(folder, bad, LABELS)
    with pytest.raises(ValueError, match="must end in .jsonl"):
        sources.read_folder(folder, bad.rename(tmp_path / "bad.txt"), LABELS)
    with pytest.raises(FileNotFoundError):
        sources.read_folder(folder, tmp_path / "nope.jsonl", LABELS)


def test_read_folder_bad_records(folder, tmp_path):
    (tmp_path / "outside.png").write_bytes(png(9))  # exists, but outside the root
    (folder / "imgs" / "link.png").symlink_to(tmp_path / "outside.png")
    (folder / "imgs" / "trunc.png").write_bytes(png(4)[:40])
    ann = tmp_path / "ann.jsonl"
    lines = [
        json.dumps({"image": "imgs/trunc.png", "label": "awe"}),
        json.dumps({"image": "imgs/missing.png", "label": "awe"}),
        json.dumps({"image": "imgs/0.png", "label": "happiness", "id": "r2"}),
        json.dumps({"image": "../outside.png", "label": "awe"}),
        json.dumps({"image": "imgs/link.png", "label": "awe"}),
        json.dumps({"image": str(tmp_path / "outside.png"), "label": "awe"}),
        "{not json",
        json.dumps({"label": "awe"}),
        json.dumps({"image": "imgs/../imgs/1.png", "label": "awe"}),
    ]
    ann.write_text("\n".join(lines) + "\n")
    it = sources.read_folder(folder, ann, LABELS)
    expected = [
        r"ann\.jsonl line 1 \(id imgs/trunc\.png\) \(.*trunc\.png\): image is not a readable image file",
        r"ann\.jsonl line 2 \(id imgs/missing\.png\): image file .*missing\.png does not exist",
        r"ann\.jsonl line 3 \(id r2\): label 'happiness' is not one of \['amusement'",
        r"ann\.jsonl line 4 \(id \.\./outside\.png\): image path '\.\./outside\.png' resolves to "
        r".*outside the data root",
        r"ann\.jsonl line 5 \(id imgs/link\.png\): image path 'imgs/link\.png' resolves to .*outside\.png, outside",
        r"ann\.jsonl line 6 .*outside the data root",
        r"ann\.jsonl line 7: expected one JSON object per line",
        r"ann\.jsonl line 8: missing required field 'image'",
    ]
    for pattern in expected:
        with pytest.raises(BadRecord, match=pattern):
            next(it)
    assert next(it)["image"] == png(1)  # `..` that stays inside the root is fine
    with pytest.raises(StopIteration):
        next(it)


def make_emoset118k(root, n_per_label=2, labels=("awe", "fear", "sadness")):
    """A tiny fake EmoSet-118K release: image/<emotion>/*.jpg, annotation/<emotion>/*.json, split lists."""
    items = []
    for li, label in enumerate(labels):
        (root / "image" / label).mkdir(parents=True, exist_ok=True)
        (root / "annotation" / label).mkdir(parents=True, exist_ok=True)
        for k in range(n_per_label):
            image_id = f"{label}_{k:05d}"
            (root / "image" / label / f"{image_id}.jpg").write_bytes(png(10 * li + k, "JPEG"))
            (root / "annotation" / label / f"{image_id}.json").write_text(json.dumps({"emotion": label}))
            items.append([label, image_id, f"image/{label}/{image_id}.jpg", f"annotation/{label}/{image_id}.json"])
    (root / "info.json").write_text(json.dumps({"emotion": {"label2idx": {x: i for i, x in enumerate(labels)}}}))
    (root / "train.json").write_text(json.dumps(items[::2]))
    (root / "val.json").write_text(json.dumps([]))
    (root / "test.json").write_text(json.dumps(items[1::2]))
    return items


def test_read_emoset118k(tmp_path):
    items = make_emoset118k(tmp_path)
    train = list(sources.read_emoset118k(tmp_path, "train", LABELS))
    test = list(sources.read_emoset118k(tmp_path, "test", LABELS))
    assert [r["id"] for r in train] == [x[1] for x in items[::2]]
    assert [r["id"] for r in test] == [x[1] for x in items[1::2]]
    assert train[1] == {
        "id": "fear_00000",
        "image": png(10, "JPEG"),
        "label": "fear",
        "problem": "",
        "answer": "",
        "truth": "",
    }
    assert list(sources.read_emoset118k(tmp_path, "val", LABELS)) == []
    with pytest.raises(ValueError, match="split must be one of"):
        sources.read_emoset118k(tmp_path, "dev", LABELS)

    (tmp_path / "test.json").write_text(json.dumps([["fear", "fear_x", "image/fear/fear_x.jpg", "a"], ["fear"]]))
    it = sources.read_emoset118k(tmp_path, "test", ["fear"])
    with pytest.raises(BadRecord, match=r"test\.json item 0 \(id fear_x\): image file .*fear_x\.jpg does not exist"):
        next(it)
    with pytest.raises(BadRecord, match=r"test\.json item 1: expected \[emotion, image_id, image_path"):
        next(it)
    it = sources.read_emoset118k(tmp_path, "train", ["fear"])
    with pytest.raises(BadRecord, match=r"train\.json item 0 \(id awe_00000\): label 'awe' is not one of \['fear'\]"):
        next(it)


class FakeRecords:
    """An iterator that raises BadRecord at given positions and stays usable, like the readers."""

    def __init__(self, n, bad):
        self.i, self.n, self.bad = 0, n, set(bad)

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        if self.i - 1 in self.bad:
            raise BadRecord(f"fake row {self.i - 1}: broken")
        return {"id": str(self.i - 1)}


def test_checked_without_skip_reraises():
    out = checked(FakeRecords(10, bad=[3]), skip_bad=False, max_bad_fraction=0.5, counter={})
    assert [next(out)["id"] for _ in range(3)] == ["0", "1", "2"]
    with pytest.raises(BadRecord, match="fake row 3"):
        next(out)


def test_checked_skips_and_counts():
    counter = {}
    ids = [r["id"] for r in checked(FakeRecords(40, bad=[3, 17]), skip_bad=True, max_bad_fraction=0.1, counter=counter)]
    assert len(ids) == 38 and "3" not in ids and "17" not in ids
    assert counter == {"seen": 40, "bad": 2}


def test_checked_stops_above_max_fraction():
    # 3 bad in the first 20 is 15% > 10%: the limit applies once 20 were seen (the 20th record).
    counter = {}
    out = checked(FakeRecords(40, bad=[0, 1, 2]), skip_bad=True, max_bad_fraction=0.1, counter=counter)
    got = []
    with pytest.raises(RuntimeError, match=r"3 of 20 seen \(15\.0%\) exceeds max_bad_fraction=0\.1; last: fake row 2"):
        for r in out:
            got.append(r)
    assert len(got) == 16 and counter == {"seen": 20, "bad": 3}  # stops before yielding the 20th
    # Below 20 seen the limit waits: 2 bad of the first 19 is fine mid-stream ...
    ids = list(checked(FakeRecords(25, bad=[0, 1]), skip_bad=True, max_bad_fraction=0.1, counter={}))
    assert len(ids) == 23
    # ... but a short stream is judged at its end.
    with pytest.raises(RuntimeError, match=r"2 of 10 seen"):
        list(checked(FakeRecords(10, bad=[0, 1]), skip_bad=True, max_bad_fraction=0.1, counter={}))


def test_checked_with_reader_and_generator(folder, tmp_path):
    ann = tmp_path / "ann.jsonl"
    lines = [{"image": f"imgs/{i % 5}.png", "label": "awe", "id": str(i)} for i in range(30)]
    lines[7]["label"] = "joy"
    ann.write_text("\n".join(json.dumps(x) for x in lines))
    counter = {}
    recs = list(
        checked(sources.read_folder(folder, ann, LABELS), skip_bad=True, max_bad_fraction=0.05, counter=counter)
    )
    assert len(recs) == 29 and counter == {"seen": 30, "bad": 1}

    def gen():
        yield {"id": "0"}
        raise BadRecord("gen row 1")

    with pytest.raises(TypeError, match="cannot skip a bad record inside a generator"):
        list(checked(gen(), skip_bad=True, max_bad_fraction=0.5, counter={}))
