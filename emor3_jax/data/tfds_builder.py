"""Writes RECORDS (see `sources`) as a TFDS data set of ArrayRecord files, without TensorFlow.

  path = build({"train": train_records, "test": test_records}, "/data/tfds", "emoset2k")
  # -> /data/tfds/emoset2k/1.0.0, read with pipeline.open_split("/data/tfds", "emoset2k", "train")
  # out_dir is local: ArrayRecord writes local files (store.build uploads a URI workdir's copy)

Features: `id`, `label`, `problem`, `answer`, `truth` are Text; `image` is a scalar
bytes Tensor holding the encoded file unchanged (an `Image` feature would
decode to pixels on reading, which needs TensorFlow or re-encoding; raw bytes
round-trip exactly and the processor decodes them later).

Idempotency: each split's fingerprint (sha256 over the sorted sha256 of every
record's fields) is stored in the data set's metadata (`metadata.json`,
written by tfds together with `dataset_info.json` after all splits are
written, so a finished directory always has it). When `out_dir/name/1.0.0`
already exists, `build` computes the fingerprints of the given records
(reading them once, writing nothing) and compares: equal -> skipped, the path
is returned; different -> ValueError, unless `overwrite=True`, which deletes
and rebuilds. An interrupted build leaves only tfds's `incomplete.*`
directory, which is not taken as a finished data set.
"""

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from emor3_jax.data.sources import RECORD_KEYS, BadRecord

log = logging.getLogger(__name__)

VERSION = "1.0.0"
# Bump when the feature layout or the fingerprint recipe changes.
FORMAT = "emor3-records-v2"  # v2: the `truth` feature
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLIT = re.compile(r"^[a-z][a-z0-9_]*$")


def dataset_path(out_dir, name: str) -> str:
    """Where `build(..., out_dir, name)` writes: out_dir/name/VERSION."""
    return os.path.join(os.fspath(out_dir), name, VERSION)


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.Text(),
            "problem": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "truth": tfds.features.Text(),
        }
    )


def _checked_record(record, where: str) -> dict:
    if not isinstance(record, dict) or set(record) != set(RECORD_KEYS):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise BadRecord(f"{where}: expected a record with keys {list(RECORD_KEYS)}, got {keys}")
    rid = record["id"]
    where = f"{where} (id {rid!r})"
    if not isinstance(rid, str) or not rid:
        raise BadRecord(f"{where}: `id` must be a non-empty string")
    if not isinstance(record["image"], bytes) or not record["image"]:
        raise BadRecord(f"{where}: `image` must be non-empty encoded image bytes")
    for key in ("label", "problem", "answer", "truth"):
        if not isinstance(record[key], str):
            raise BadRecord(f"{where}: `{key}` must be a string, got {type(record[key]).__name__}")
    return record


def _record_digest(record: dict) -> bytes:
    h = hashlib.sha256()
    for key in RECORD_KEYS:
        value = record[key] if key == "image" else record[key].encode("utf-8")
        h.update(len(value).to_bytes(8, "little"))
        h.update(value)
    return h.digest()


class _Fingerprint:
    """Order-independent digest of a split; also catches duplicate ids."""

    def __init__(self, split: str):
        self.split = split
        self.digests: list[bytes] = []
        self.ids: set[str] = set()

    def add(self, record: dict) -> dict:
        record = _checked_record(record, f"split {self.split!r} record {len(self.digests)}")
        if record["id"] in self.ids:
            raise ValueError(f"split {self.split!r}: duplicate id {record['id']!r} (ids must be unique per split)")
        self.ids.add(record["id"])
        self.digests.append(_record_digest(record))
        return record

    def hexdigest(self) -> str:
        h = hashlib.sha256(FORMAT.encode())
        for d in sorted(self.digests):
            h.update(d)
        return f"{len(self.digests)}:{h.hexdigest()}"


def _make_builder_class(name: str, splits: Mapping[str, Iterable[dict]]):
    class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        # No checksums file next to the code. (tfds's own lookup of the code path imports the
        # `importlib_resources` backport, which we do not install.)
        code_path = None

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"emor3_jax records ({FORMAT})",
                features=_features(),
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, records) for split, records in splits.items()}

        def _generate_examples(self, split: str, records: Iterable[dict]) -> Iterator[tuple[str, dict]]:
            fp = _Fingerprint(split)
            for record in records:
                record = fp.add(record)
                yield record["id"], record
            if not fp.digests:
                raise ValueError(f"split {split!r} of {name!r} has no records")
            # Runs after the last example; tfds writes metadata.json after all splits.
            self.info.metadata[f"fingerprint_{split}"] = fp.hexdigest()

    _RecordsBuilder.name = name
    return _RecordsBuilder


def _stored_fingerprints(path: str) -> dict[str, str]:
    info = tfds.builder_from_directory(path).info
    metadata = info.metadata or {}
    return {k.removeprefix("fingerprint_"): v for k, v in metadata.items() if k.startswith("fingerprint_")}


def _fingerprints(splits: Mapping[str, Iterable[dict]]) -> dict[str, str]:
    out = {}
    for split, records in splits.items():
        fp = _Fingerprint(split)
        for record in records:
            fp.add(record)
        out[split] = fp.hexdigest()
    return out


def build(splits: Mapping[str, Iterable[dict]], out_dir, name: str, *, overwrite: bool = False) -> str:
    """Writes `splits` ({"train": records, "test": records, ...}) to out_dir/name/1.0.0.

    Each iterable is read once. Returns the data set directory. See the module
    docstring for how an existing identical data set is detected and skipped.
    Raises BadRecord for a malformed record, ValueError for duplicate ids, an
    empty split, a bad name, or an existing different data set.
    """
    if not _NAME.match(name):
        raise ValueError(f"data set name must match {_NAME.pattern} (tfds naming), got {name!r}")
    if not splits:
        raise ValueError("no splits given")
    for split in splits:
        if not _SPLIT.match(split):
            raise ValueError(f"split name must match {_SPLIT.pattern}, got {split!r}")
    path = dataset_path(out_dir, name)

    if os.path.exists(os.path.join(path, "dataset_info.json")):
        if overwrite:
            log.info("overwrite=True: deleting %s", path)
            shutil.rmtree(path)
        else:
            stored = _stored_fingerprints(path)
            if not stored:
                raise ValueError(
                    f"{path} exists but has no record fingerprints (not written by this builder?); "
                    "delete that directory or use a fresh --config.workdir"
                )
            given = _fingerprints(splits)
            if given != stored:
                raise ValueError(
                    f"{path} holds a different data set than --config.data.* give (stored fingerprints {stored}, "
                    f"given {given}): set --config.data.* back to the data this workdir was built from, use a "
                    f"fresh --config.workdir, or delete {path} to rebuild it"
                )
            log.info("%s already holds these records; skipping the build", path)
            return path

    # tfds's empty downloads/ goes to a temporary directory, not out_dir; so does the one it makes
    # (tempfile.mkdtemp, never removed) for published metadata a new builder looks for.
    with tempfile.TemporaryDirectory() as tmp:
        previous, tempfile.tempdir = tempfile.tempdir, tmp
        try:
            builder = _make_builder_class(name, splits)(data_dir=os.fspath(out_dir), file_format="array_record")
            builder.download_and_prepare(download_dir=tmp)
        finally:
            tempfile.tempdir = previous
    return path
