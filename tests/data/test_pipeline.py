"""Tests for emor3_jax.data.tfds_builder and emor3_jax.data.pipeline: build -> grain read round trip,
the synthetic truth carried through, idempotent rebuilds, per-epoch shuffling, sharding and resumption."""

import io
import json
import os

import pytest
import tensorflow_datasets as tfds
from PIL import Image

from emor3_jax.data import pipeline, sources, synthetic, tfds_builder
from emor3_jax.data.sources import BadRecord

LABELS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
N_TRAIN, N_TEST = 24, 8


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5 + i % 4, 3), (i * 9 % 256, 40, 200)).save(buf, "PNG")
    return buf.getvalue()


def records(n, prefix):
    return [
        {
            "id": f"{prefix}{i:03d}",
            "image": png(i),
            "label": LABELS[i % 8],
            "problem": f"Q {i} é" if i % 2 else "",
            "answer": LABELS[i % 8] if i % 3 else "",
            "truth": json.dumps({"figure": "ball", "size_class": i % 3}) if i % 4 else "",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds")
    path = tfds_builder.build({"train": iter(records(N_TRAIN, "tr")), "test": iter(records(N_TEST, "te"))}, out, "toy")
    assert path == os.path.join(str(out), "toy", tfds_builder.VERSION)
    return str(out)


def ids(batches):
    return [r["id"] for b in batches for r in b]


def iterator(data_dir, **kw):
    args = dict(batch_size=4, seed=0, shuffle=True, num_epochs=1, shard_index=0, shard_count=1)
    args.update(kw)
    return pipeline.make_iterator(data_dir, "toy", "train", **args)


def test_round_trip_exact(data_dir):
    for split, n, prefix in [("train", N_TRAIN, "tr"), ("test", N_TEST, "te")]:
        ds = pipeline.open_split(data_dir, "toy", split)
        assert len(ds) == n
        got = {r["id"]: r for r in (ds[i] for i in range(len(ds)))}
        assert got == {r["id"]: r for r in records(n, prefix)}  # exact image bytes, str fields
        assert all(type(v) is (bytes if k == "image" else str) for r in got.values() for k, v in r.items())
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'val'"):
        pipeline.open_split(data_dir, "toy", "val")
    with pytest.raises(FileNotFoundError, match="no data set 'nope'"):
        pipeline.open_split(data_dir, "nope", "train")


def test_synthetic_truth_travels_with_the_records(tmp_path):
    kw = dict(count=8, seed=3, image_size=56, unfaithful_share=0.5)
    train = sources.read_split("synthetic", "", "", "train", LABELS, **kw)
    tfds_builder.build({"train": train}, tmp_path, "syn")
    got = {r["id"]: r for r in pipeline.open_split(tmp_path, "syn", "train")}
    assert len(got) == 8
    for i in range(8):
        ex = synthetic.make_example(i, seed=3, split="train", unfaithful_share=0.5)
        record = got[ex["id"]]
        assert json.loads(record["truth"]) == ex["truth"]
        assert record["answer"] == ex["answer"] and record["label"] == ex["label"]
    assert sum(json.loads(r["truth"])["unfaithful"] != "" for r in got.values()) == 4
    # The truth is a field of the records: changing it changes the data set.
    changed = list(sources.read_split("synthetic", "", "", "train", LABELS, **kw))
    changed[0]["truth"] = ""
    with pytest.raises(ValueError, match="holds a different data set"):
        tfds_builder.build({"train": changed}, tmp_path, "syn")
    with pytest.raises(ValueError, match="only synthetic answers can be made unfaithful"):
        sources.read_split("folder", str(tmp_path), "a.jsonl", "test", LABELS, **kw)


def test_data_set_without_truth_is_refused(tmp_path, monkeypatch):
    """A data set written before records had a truth: reading it says to rebuild it."""
    old_keys = ("id", "image", "label", "problem", "answer")
    features = tfds_builder._features()
    monkeypatch.setattr(tfds_builder, "RECORD_KEYS", old_keys)
    monkeypatch.setattr(tfds_builder, "_checked_record", lambda record, where: record)
    monkeypatch.setattr(
        tfds_builder, "_features", lambda: tfds.features.FeaturesDict({k: features[k] for k in old_keys})
    )
    old = [{k: v for k, v in r.items() if k != "truth"} for r in records(2, "o")]
    tfds_builder.build({"train": old}, tmp_path, "old")
    with pytest.raises(ValueError, match=r"lacks features \['truth'\] \(written by an older builder\)"):
        pipeline.open_split(tmp_path, "old", "train")


def test_rebuild_identical_is_skipped_different_raises(data_dir):
    path = os.path.join(data_dir, "toy", tfds_builder.VERSION)
    stamps = {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)}
    # Same records in another order: same data set, nothing rewritten.
    again = tfds_builder.build(
        {"train": reversed(records(N_TRAIN, "tr")), "test": records(N_TEST, "te")}, data_dir, "toy"
    )
    assert again == path
    assert {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)} == stamps

    changed = records(N_TRAIN, "tr")
    changed[5]["label"] = "fear" if changed[5]["label"] != "fear" else "awe"
    with pytest.raises(ValueError, match="holds a different data set"):
        tfds_builder.build({"train": changed, "test": records(N_TEST, "te")}, data_dir, "toy")
    with pytest.raises(ValueError, match="holds a different data set"):  # a split missing
        tfds_builder.build({"train": records(N_TRAIN, "tr")}, data_dir, "toy")


def test_build_overwrite_and_errors(tmp_path):
    tfds_builder.build({"train": records(8, "a"), "test": records(2, "b")}, tmp_path, "small")
    tfds_builder.build({"train": records(6, "c"), "test": records(2, "b")}, tmp_path, "small", overwrite=True)
    assert sorted(r["id"] for r in pipeline.open_split(tmp_path, "small", "train")) == [f"c{i:03d}" for i in range(6)]

    dup = records(3, "d") + records(1, "d")
    with pytest.raises(ValueError, match="duplicate id 'd000'"):
        tfds_builder.build({"train": dup}, tmp_path, "dup")
    bad = records(3, "e")
    bad[1]["image"] = "not bytes"
    with pytest.raises(BadRecord, match=r"split 'train' record 1 \(id 'e001'\): `image` must be"):
        tfds_builder.build({"train": bad}, tmp_path, "bad")
    no_truth = records(2, "g")
    del no_truth[1]["truth"]
    with pytest.raises(BadRecord, match=r"split 'train' record 1: expected a record with keys .*'truth'\]"):
        tfds_builder.build({"train": no_truth}, tmp_path, "no_truth")
    with pytest.raises(ValueError, match="split 'train' of 'empty' has no records"):
        tfds_builder.build({"train": []}, tmp_path, "empty")
    assert not os.path.exists(os.path.join(tmp_path, "empty", tfds_builder.VERSION))
    with pytest.raises(ValueError, match="data set name must match"):
        tfds_builder.build({"train": records(2, "f")}, tmp_path, "Bad-Name")


def test_one_epoch_covers_all_and_stops(data_dir):
    batches = list(iterator(data_dir, batch_size=5, num_epochs=1))
    assert len(batches) == N_TRAIN // 5 and all(len(b) == 5 for b in batches)
    assert len(set(ids(batches))) == 20
    partial = list(iterator(data_dir, batch_size=5, num_epochs=1, drop_remainder=False))
    assert [len(b) for b in partial] == [5, 5, 5, 5, 4]
    assert sorted(ids(partial)) == [f"tr{i:03d}" for i in range(N_TRAIN)]
    # Two epochs, 48 records: 9 full batches of 5, each epoch a permutation.
    two = ids(iterator(data_dir, batch_size=5, num_epochs=2))
    assert len(two) == 45 and sorted(two[:N_TRAIN]) == sorted(ids(partial))


def test_shuffle_by_seed_and_epoch(data_dir):
    def order(seed, shuffle=True):
        return ids(iterator(data_dir, batch_size=N_TRAIN, seed=seed, shuffle=shuffle, num_epochs=2))

    a, a_again, b = order(0), order(0), order(1)
    assert a == a_again
    assert a != b and sorted(a[:N_TRAIN]) == sorted(b[:N_TRAIN])
    assert a[:N_TRAIN] != a[N_TRAIN:]  # a new permutation each epoch
    plain = order(0, shuffle=False)
    assert plain[:N_TRAIN] == plain[N_TRAIN:] and plain[:N_TRAIN] != a[:N_TRAIN]


@pytest.mark.parametrize("batch_size", [3, 5])
def test_two_shards_partition(data_dir, batch_size):
    shards = [
        ids(iterator(data_dir, batch_size=batch_size, num_epochs=1, shard_index=i, shard_count=2)) for i in range(2)
    ]
    # Cut to a multiple of batch_size * 2: same number of batches on both shards.
    keep = N_TRAIN // (2 * batch_size) * 2 * batch_size
    assert len(shards[0]) == len(shards[1]) == keep // 2
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == keep
    # Without the cut the two shards together hold every record exactly once.
    full = [
        ids(iterator(data_dir, batch_size=batch_size, num_epochs=1, shard_index=i, shard_count=2, drop_remainder=False))
        for i in range(2)
    ]
    assert sorted(full[0] + full[1]) == [f"tr{i:03d}" for i in range(N_TRAIN)]
    # Endless: shard i holds block i of each global batch, so the shards' batches side by side
    # are the batches of one process reading batch_size * 2 (not alternate records).
    whole_it = iterator(data_dir, batch_size=2 * batch_size, num_epochs=None)
    endless = [
        iterator(data_dir, batch_size=batch_size, num_epochs=None, shard_index=i, shard_count=2) for i in range(2)
    ]
    for _ in range(2 * N_TRAIN // batch_size):  # past several epoch boundaries
        assert ids([next(endless[0])]) + ids([next(endless[1])]) == ids([next(whole_it)])


@pytest.mark.parametrize("shard_index", [0, 1])
def test_resume_with_get_state_set_state(data_dir, shard_index):
    kw = dict(batch_size=5, seed=7, num_epochs=None, shard_index=shard_index, shard_count=2)
    it = iterator(data_dir, **kw)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]  # runs past an epoch boundary (12 records per shard-epoch)
    resumed = iterator(data_dir, **kw)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(6)] == expected
    # A different seed from the same state gives other batches (the state is an index, not the data).
    other = iterator(data_dir, **{**kw, "seed": 8})
    other.set_state(state)
    assert [next(other) for _ in range(6)] != expected


def test_make_iterator_errors(data_dir):
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        iterator(data_dir, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="give no full global batch of 16 x 2 shards"):
        iterator(data_dir, batch_size=16, shard_count=2)
