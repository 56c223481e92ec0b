"""Readers that turn image-emotion data sets into RECORDS, one module per source, and
`read_split`, the one dispatch on the source's name.

A RECORD is a dict:

  {"id": str, "image": bytes, "label": str, "problem": str, "answer": str, "truth": str}

`image` is the encoded image file exactly as stored (PNG, JPEG, or any format
PIL decodes); `label` is lower case and one of the caller's `labels`;
`problem` is the question text ("" if the source has none); `answer` is the
source's reference answer ("" if none); `truth` is what the source knows of the image
beyond its label, as JSON: the synthetic set's drawn figure and what its answer says
(synthetic.make_example), "" for every real data set.

Modules (each named after the --config.data.source value, or the data.cold_start flag, that
picks it, so a flag leads to its file):
  synthetic       read_synthetic(split, labels, ...)              generated in code
  emoset_parquet  read_emoset_parquet(path_or_dir, labels)        EmoSet-2k, HF `datasets` parquet
                                                                  (a split of a folder: <dir>@train)
  folder          read_folder(root, annotations_file, labels)     images under root + JSONL/CSV
  emoset118k      read_emoset118k(root, split, labels)            the official EmoSet-118K release
  cold_start      read_cold_start(path, labels)                   SET-answer SFT data (JSONL, a JSON array
                                                                  or parquet): image, problem/question,
                                                                  response, or ShareGPT-style messages
  common          what they share: BadRecord, the record iterator, label/image/path checks,
                  parquet and JSONL/CSV rows
  filters         checked (skip bad records), drop_overlong, require_set_answers
  split_files     the files of one split of a folder (`<dir>@<split>`) by the hub's file naming
  overlap         train/test data that share files or identical images (stops the run)

Each reader checks the top level (files present, columns present) when called
and raises ValueError / FileNotFoundError then. Each record is read and checked
when it is drawn; a bad one raises `BadRecord` naming the file, row and id.
The iterator stays usable after a `BadRecord`, so `checked(...)` can skip bad
records and go on:

  records = checked(read_folder(root, "ann.jsonl", LABELS), skip_bad=True,
                    max_bad_fraction=0.01, counter={})

Every path may be local or a URI (gs://...): files are read through epath (core/paths).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from emor3_jax.data.sources.cold_start import read_cold_start
from emor3_jax.data.sources.common import RECORD_KEYS, BadRecord
from emor3_jax.data.sources.emoset118k import read_emoset118k
from emor3_jax.data.sources.emoset_parquet import label_from_answer, read_emoset_parquet
from emor3_jax.data.sources.filters import checked, drop_overlong, require_set_answers
from emor3_jax.data.sources.folder import read_folder
from emor3_jax.data.sources.synthetic import read_synthetic

__all__ = [
    "RECORD_KEYS",
    "SOURCES",
    "BadRecord",
    "checked",
    "drop_overlong",
    "label_from_answer",
    "read_cold_start",
    "read_emoset118k",
    "read_emoset_parquet",
    "read_folder",
    "read_split",
    "read_synthetic",
    "require_set_answers",
]

SOURCES = ("synthetic", "emoset_parquet", "folder", "emoset118k")


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
    synthetic_detail: str = "size",
) -> Iterator[dict]:
    """RECORDS of one split of `source`.

      records = read_split("folder", "/data/Emotion6", "/data/Emotion6/test.jsonl", "test",
                           EMOTION6_LABELS, count=0, seed=0, image_size=56)

    synthetic: `count` generated examples of `split` (train | test) for `seed`, images
    `image_size` pixels a side or `image_sides` (see read_synthetic), a share
    `unfaithful_share` of the answers with a wrong detail, step 1 naming `synthetic_detail`
    beside the figure (synthetic.DETAILS); `path`, `annotations` unused. Other sources:
    `unfaithful_share` must be 0 and `synthetic_detail` "size" (the default, unused).
    emoset_parquet: the parquet file/dir `path`. folder: images under `path` listed in the
    JSONL/CSV `annotations`. emoset118k: split `split` (train | val | test) of the release at
    `path`. The readers' iterators are returned as they are (not wrapped in a generator), so
    `checked` can skip their bad records.
    """
    if source == "synthetic":
        return read_synthetic(
            split,
            labels,
            count=count,
            seed=seed,
            image_size=image_size,
            image_sides=image_sides,
            unfaithful_share=unfaithful_share,
            detail=synthetic_detail,
        )
    if unfaithful_share:
        raise ValueError(f"unfaithful_share={unfaithful_share}: only synthetic answers can be made unfaithful")
    if synthetic_detail != "size":
        raise ValueError(f"synthetic_detail={synthetic_detail!r}: only the synthetic source draws a detail")
    if source == "emoset_parquet":
        return read_emoset_parquet(path, labels)
    if source == "folder":
        return read_folder(path, annotations, labels)
    if source == "emoset118k":
        return read_emoset118k(path, split, labels)
    raise ValueError(f"unknown source {source!r}; use one of {SOURCES}")
