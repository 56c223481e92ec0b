"""Train/test overlap: a run whose test split shares data files or identical images with its
train split measures what it trained on, not what it learned. Both checks stop the run at
start-up unless --config.data.allow_train_test_overlap says the overlap is intended.

Shared files are found from the paths alone, before anything is read (`split_data_files`,
`shared_files`); identical images by a hash of each record's encoded bytes (no decode) while the
data store is built (`ImageOverlap`), which only the main process does, reading every record
once anyway.
"""

import hashlib
from collections.abc import Iterable, Iterator

from emor3_jax.core import paths
from emor3_jax.data.sources.split_files import parquet_source_files

FLAG = "--config.data.allow_train_test_overlap=True"
_SHOWN = 5  # ids named in a message


def split_data_files(source: str, path: str, annotations: str) -> list[str]:
    """The files that hold one split's records: its parquet files (emoset_parquet) or its
    annotation file (folder; train and test may share the image folder, never the list of
    records). [] for sources whose splits a reader picks inside one release (emoset118k, synthetic)."""
    if source == "emoset_parquet":
        return parquet_source_files(path)
    if source == "folder":
        return [annotations]
    return []


def shared_files(train: Iterable[str], test: Iterable[str]) -> list[str]:
    """The files (symlinks resolved, sorted) in both lists."""
    return sorted({paths.resolve(f)[0] for f in train} & {paths.resolve(f)[0] for f in test})


def shared_files_message(shared: list[str]) -> str:
    names = ", ".join(shared[:_SHOWN]) + (", ..." if len(shared) > _SHOWN else "")
    return (
        f"--config.data.train and --config.data.test share {len(shared)} data file(s) ({names}): the test split "
        "would score records trained on; point them at disjoint files (a folder with both splits: "
        f"<dir>@train and <dir>@test), or pass {FLAG} if the overlap is intended"
    )


class ImageOverlap:
    """Watches the records of the train and test splits stream by; once both have ended, raises
    ValueError naming how many test records have an image byte-identical to a train record's,
    and the first few (test id = train id).

      overlap = ImageOverlap()
      train, test = overlap.watch("train", train), overlap.watch("test", test)
    """

    def __init__(self):
        self._first = {"train": {}, "test": {}}  # sha256 of the image bytes -> first id with it
        self._ids = {"train": [], "test": []}  # (digest, id) of every record, in order
        self._ended = set()

    def watch(self, split: str, records: Iterable[dict]) -> Iterator[dict]:
        """`records` of `split` ("train" | "test") as they are; the check runs when the second
        of the two splits ends."""
        for record in records:
            digest = hashlib.sha256(record["image"]).digest()
            self._first[split].setdefault(digest, record["id"])
            self._ids[split].append((digest, record["id"]))
            yield record
        self._ended.add(split)
        if self._ended == {"train", "test"}:
            self._check()

    def _check(self) -> None:
        train = self._first["train"]
        pairs = [(rid, train[d]) for d, rid in self._ids["test"] if d in train]
        if pairs:
            shown = ", ".join(f"{t} = {r}" for t, r in pairs[:_SHOWN]) + (", ..." if len(pairs) > _SHOWN else "")
            raise ValueError(
                f"{len(pairs)} of {len(self._ids['test'])} test records have an image identical to a train "
                f"record's (test id = train id: {shown}): the test split would score images trained on; use "
                f"data whose splits are disjoint, or pass {FLAG} if the overlap is intended"
            )
