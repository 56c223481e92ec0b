"""One split of any supported source as RECORDS, and the records of an evaluation data set.

A RECORD is {"id", "image" (encoded bytes), "label", "problem", "answer", "truth"} (see sources.py).

  records = read_split("folder", "/data/Emotion6", "/data/Emotion6/test.jsonl", "test",
                       EMOTION6_LABELS, count=0, seed=0, image_size=56)

An evaluation data set (`config.eval.datasets.<name>`) is {source, path, annotations, split,
labels, num_examples}; `load_eval_records` gives its records as a plain list, on every
process the same (a multi-host caller shards the list).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from ml_collections import ConfigDict

from emor3_jax.data import sources

SOURCES = ("synthetic", "emoset_parquet", "folder", "emoset118k")
SYNTHETIC_SPLITS = ("train", "test")


def read_split(
    source: str,
    path: str,
    annotations: str,
    split: str,
    labels: Sequence[str],
    *,
    count: int,
    seed: int,
    image_size: int,
    image_sides: Sequence[int] = (),
    unfaithful_share: float = 0.0,
) -> Iterator[dict]:
    """RECORDS of one split of `source`.

    synthetic: `count` generated examples of `split` (train | test) for `seed`, images
    `image_size` pixels a side (with `image_sides` = (min, max): web-photo sizes, see
    synthetic.image_shape), encoded as PNG, their truth as JSON; a share
    `unfaithful_share` of the answers carries a wrong detail (synthetic.make_example);
    `path`, `annotations` unused. Other sources: `unfaithful_share` must be 0.
    emoset_parquet: the parquet file/dir `path`. folder: images under `path` listed in the
    JSONL/CSV `annotations`. emoset118k: split `split` (train | val | test) of the release at
    `path`. The readers' iterators are returned as they are (not wrapped in a generator), so
    `sources.checked` can skip their bad records.
    """
    if source == "synthetic":
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"synthetic split must be one of {SYNTHETIC_SPLITS}, got {split!r}")
        return _synthetic(count, seed, image_size, image_sides, split, labels, unfaithful_share)
    if unfaithful_share:
        raise ValueError(f"unfaithful_share={unfaithful_share}: only synthetic answers can be made unfaithful")
    if source == "emoset_parquet":
        return sources.read_emoset_parquet(path, labels)
    if source == "folder":
        return sources.read_folder(path, annotations, labels)
    if source == "emoset118k":
        return sources.read_emoset118k(path, split, labels)
    raise ValueError(f"unknown source {source!r}; use one of {SOURCES}")


def _synthetic(
    count: int,
    seed: int,
    image_size: int,
    image_sides: Sequence[int],
    split: str,
    labels: Sequence[str],
    unfaithful_share: float,
) -> Iterator[dict]:
    from emor3_jax.data.synthetic import SyntheticEmotions, to_record

    for ex in SyntheticEmotions(
        count, seed, size=image_size, split=split, unfaithful_share=unfaithful_share, sides=tuple(image_sides) or None
    ):
        if ex["label"] not in labels:
            raise ValueError(f"synthetic record {ex['id']}: label {ex['label']!r} is not one of {list(labels)}")
        yield to_record(ex)


def load_eval_records(ds: ConfigDict, c: ConfigDict, counter: dict) -> list[dict]:
    """The first `ds.num_examples` records (0: all) of evaluation data set `ds`.

    Bad records are skipped and counted in `counter` as `c.data.skip_bad` and
    `c.data.max_bad_fraction` say; synthetic records use `c.seed`, `c.data.image_size` and
    `c.data.image_sides`.
    """
    records = read_split(
        ds.source,
        ds.path,
        ds.annotations,
        ds.split,
        list(ds.labels),
        count=ds.num_examples,
        seed=c.seed,
        image_size=c.data.image_size,
        image_sides=tuple(c.data.image_sides),
    )
    if ds.source != "synthetic":  # generated records cannot be bad
        records = sources.checked(records, c.data.skip_bad, c.data.max_bad_fraction, counter)
    return list(itertools.islice(records, ds.num_examples or None))
