"""Data by the official names: `owner/name@split` from the Hugging Face cache (no network:
HF_HUB_OFFLINE=1 and a cache of our own in tmp), `<dir>@split` picked by the hub's file naming
(the expected splits worked out by hand from datasets' default data-files patterns), and the
train/test overlap refusal with its override flag."""

import pytest
from huggingface_hub import constants

from configs.qwen_vl import get_config
from emor3_jax import config_lib
from emor3_jax.data import pipeline, sources, store
from emor3_jax.data.sources import split_files
from tests.data.test_sources import LABELS, parquet_rows, write_hf_parquet

REPO = "emor3-test/EmoSet2k"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))  # an empty cache of our own


@pytest.mark.parametrize(
    "files, expected",
    [
        # 1. sharded (push_to_hub's names): decides even beside split-named folders; any split name
        (
            ["README.md", "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet", "test/x.parquet"],
            {"train": ["data/train-00000-of-00001.parquet"], "test": ["data/test-00000-of-00001.parquet"]},
        ),
        (["data/holdout-00000-of-00002.parquet"], {"holdout": ["data/holdout-00000-of-00002.parquet"]}),
        # 2. folder names decide before file names: valid.parquet is no split here
        (["train/a.parquet", "valid.parquet"], {"train": ["train/a.parquet"]}),
        (
            ["x/my_val/a.parquet", "evaluation-2/b.parquet"],
            {"validation": ["x/my_val/a.parquet"], "test": ["evaluation-2/b.parquet"]},
        ),
        # 3. file names: the keyword first or after a separator, a separator after it
        (
            ["train.parquet", "emoset_val.parquet", "emoset-testing0.parquet", "trainset.parquet", "pretrain.parquet"],
            {"train": ["train.parquet"], "validation": ["emoset_val.parquet"], "test": ["emoset-testing0.parquet"]},
        ),
        # 4. no split named: all of it is train
        (["a.parquet", "sub/b.parquet"], {"train": ["a.parquet", "sub/b.parquet"]}),
        # names are case-sensitive, as datasets' globs are
        (["Train.parquet", "TEST.parquet"], {"train": ["Train.parquet", "TEST.parquet"]}),
    ],
)
def test_splits_follow_the_hubs_file_naming(files, expected):
    assert split_files.splits(files) == expected


def test_parse_reads_the_split_after_the_last_at_unless_the_path_exists(tmp_path):
    assert split_files.parse("fuyyy74/EmoSet2k@train") == ("fuyyy74/EmoSet2k", "train")
    assert split_files.parse("/data/x@y/EmoSet@test") == ("/data/x@y/EmoSet", "test")
    assert split_files.parse("/data/EmoSet@tr/ain") == ("/data/EmoSet@tr/ain", None)  # not a split name
    assert split_files.parse("/data/EmoSet") == ("/data/EmoSet", None)
    (tmp_path / "run@2").mkdir()
    assert split_files.parse(str(tmp_path / "run@2")) == (str(tmp_path / "run@2"), None)


def _snapshot_layout(root, train_rows, test_rows):
    """A hub snapshot's files: data/{train,test}-00000-of-00001.parquet, README.md, .gitattributes."""
    (root / "data").mkdir(parents=True)
    write_hf_parquet(root / "data" / "train-00000-of-00001.parquet", train_rows)
    write_hf_parquet(root / "data" / "test-00000-of-00001.parquet", test_rows)
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    (root / ".gitattributes").write_text("*.parquet filter=lfs\n")
    return root


def test_dir_at_split_reads_that_splits_files_and_a_whole_dir_of_two_splits_is_refused(tmp_path):
    root = _snapshot_layout(tmp_path / "EmoSet2k", parquet_rows(5), parquet_rows(3, start=10))
    test = list(sources.read_emoset_parquet(f"{root}@test", LABELS))
    assert [r["id"] for r in test] == [f"test-00000-of-00001-{i}" for i in range(3)]
    assert [r["problem"] for r in test] == [f"<image>Which emotion? {10 + i}" for i in range(3)]
    assert len(list(sources.read_emoset_parquet(f"{root}/data@train", LABELS))) == 5  # the data/ folder alike
    with pytest.raises(FileNotFoundError, match=r"has no files of split 'validation'.*\['test', 'train'\]"):
        sources.read_emoset_parquet(f"{root}@validation", LABELS)
    # The bug this guards against: the data/ folder read whole trains on the test set too.
    with pytest.raises(ValueError, match=rf"holds the files of 2 splits \['test', 'train'\].*{root}/data@train"):
        sources.read_emoset_parquet(f"{root}/data", LABELS)
    one = root / "data" / "train-00000-of-00001.parquet"
    assert len(list(sources.read_emoset_parquet(f"{one}@train", LABELS))) == 5  # a lone file is train
    with pytest.raises(FileNotFoundError, match="a single data file is the train split alone"):
        sources.read_emoset_parquet(f"{one}@test", LABELS)


def _parquet_config(tmp_path, train: str, test: str, **overrides):
    c = get_config("tiny")
    c.workdir = str(tmp_path / "run")
    c.data.source, c.data.train, c.data.test = "emoset_parquet", train, test
    c.data.unfaithful_share = 0.0
    c.cold_start.judge_batch_size = 0
    for key, value in overrides.items():
        c.data[key] = value
    return c


def _fake_hub_cache(tmp_path, train_rows, test_rows, revision="0123abc"):
    repo = tmp_path / "hf_cache" / f"datasets--{REPO.replace('/', '--')}"
    snapshot = _snapshot_layout(repo / "snapshots" / revision, train_rows, test_rows)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_a_hub_data_set_split_resolves_from_the_cache_offline_and_builds_each_split_from_its_files(tmp_path):
    snapshot = _fake_hub_cache(tmp_path, parquet_rows(6), parquet_rows(4, start=20))
    c = _parquet_config(tmp_path, f"{REPO}@train", f"{REPO}@test")
    config_lib.resolve_hub_ids(c)
    assert (c.data.train, c.data.test) == (f"{snapshot}@train", f"{snapshot}@test")
    assert c.eval.datasets.test.path == f"{snapshot}@test"  # the run's own held-out set follows data.test
    config_lib.validate(c)
    out, counts = store.build(c)
    assert counts == {"train": {"seen": 6, "bad": 0}, "test": {"seen": 4, "bad": 0}}
    test = pipeline.open_split(out, store.NAME, "test")
    assert sorted(test[i]["problem"] for i in range(len(test))) == [f"<image>Which emotion? {20 + i}" for i in range(4)]


def test_validation_refuses_a_hub_data_set_not_yet_resolved_and_downloads_nothing(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("validation downloaded"))
    c = _parquet_config(tmp_path, f"{REPO}@train", f"{REPO}@test")
    with pytest.raises(ValueError, match=rf"--config.data.train='{REPO}@train' is a Hugging Face hub data set not yet"):
        config_lib.validate(c)


def test_an_uncached_hub_data_set_offline_is_one_line_naming_the_flag(tmp_path):
    c = _parquet_config(tmp_path, f"{REPO}@train", f"{REPO}@test")
    with pytest.raises(ValueError) as err:
        config_lib.resolve_hub_ids(c)
    message = str(err.value)
    assert "\n" not in message  # one repo, named once (for data.train, the first flag)
    assert f"--config.data.train='{REPO}' is a Hugging Face hub id that is not in the local cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "--config.data.train=/local/dir@<split>" in message


def test_the_3b_variant_names_the_official_data(tmp_path):
    c = get_config("3b")
    assert (c.data.source, c.data.train, c.data.test) == (
        "emoset_parquet",
        "fuyyy74/EmoSet2k@train",
        "fuyyy74/EmoSet2k@test",
    )
    assert not c.data.allow_train_test_overlap


def test_train_and_test_sharing_files_are_refused_at_validation_unless_allowed(tmp_path):
    root = _snapshot_layout(tmp_path / "EmoSet2k", parquet_rows(5), parquet_rows(3, start=10))
    c = _parquet_config(tmp_path, f"{root}@train", f"{root}/data/train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"share 1 data file\(s\) \(.*train-00000-of-00001\.parquet\)") as err:
        config_lib.validate(c)
    assert "--config.data.allow_train_test_overlap=True" in str(err.value)
    c.data.allow_train_test_overlap = True
    config_lib.validate(c)
    c.data.allow_train_test_overlap, c.data.test = False, f"{root}@test"
    config_lib.validate(c)


def test_identical_images_in_train_and_test_stop_the_build_naming_how_many_and_which(tmp_path):
    train, test = parquet_rows(6), parquet_rows(4, start=20)
    test[1]["image"], test[3]["image"] = train[4]["image"], train[0]["image"]  # same bytes, other questions
    root = _snapshot_layout(tmp_path / "EmoSet2k", train, test)
    c = _parquet_config(tmp_path, f"{root}@train", f"{root}@test")
    config_lib.validate(c)  # the files differ: only reading finds the images
    with pytest.raises(ValueError) as err:
        store.build(c)
    message = str(err.value)
    assert message.startswith("2 of 4 test records have an image identical to a train record's")
    assert "test-00000-of-00001-1 = train-00000-of-00001-4, test-00000-of-00001-3 = train-00000-of-00001-0" in message
    assert "--config.data.allow_train_test_overlap=True" in message
    c.data.allow_train_test_overlap = True
    out, _ = store.build(c)
    assert len(pipeline.open_split(out, store.NAME, "test")) == 4
