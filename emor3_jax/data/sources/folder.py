"""A folder of images plus a JSONL or CSV annotations file (--config.data.source=folder)."""

import csv
import functools
from collections.abc import Iterator, Sequence

from etils import epath

from emor3_jax.data.sources.common import (
    BadRecord,
    Records,
    annotation_rows,
    check_label,
    check_text,
    data_root,
    norm_labels,
    read_image_file,
)


def read_folder(root, annotations_file, labels: Sequence[str]) -> Iterator[dict]:
    """Records from images under `root` listed in a JSONL or CSV annotations file.

    Columns: `image` (path relative to `root`), `label`; optional `problem`,
    `answer` (default ""), `id` (default: the image path). A relative
    `annotations_file` is taken from the working directory, not from `root`.
    """
    labels = norm_labels(labels)
    root_real = data_root(root)
    path = str(annotations_file)
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"annotations file {path} does not exist")
    if not path.endswith((".jsonl", ".csv")):
        raise ValueError(f"annotations file {path} must end in .jsonl (one JSON object per line) or .csv")
    if path.endswith(".csv"):
        with epath.Path(path).open("r") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in ("image", "label") if c not in header]
        if missing:
            raise ValueError(f"{path}: CSV header {header} lacks columns {missing}")

    def thunks():
        for where, row in annotation_rows(path):
            yield functools.partial(_record, where, row, root_real, labels)

    return Records(thunks())


def _record(where: str, row, root_real: str, labels: frozenset[str]) -> dict:
    if isinstance(row, BadRecord):
        raise row
    if not isinstance(row, dict):
        raise BadRecord(f"{where}: expected an object with `image` and `label`, got {row!r:.80}")
    for key in ("image", "label"):
        if not row.get(key):
            raise BadRecord(f"{where}: missing required field {key!r} (row {row!r:.120})")
    rid = check_text(row.get("id") or row["image"], "id", where)
    where = f"{where} (id {rid})"
    return {
        "id": rid,
        "image": read_image_file(root_real, row["image"], where),
        "label": check_label(row["label"], labels, where),
        "problem": check_text(row.get("problem"), "problem", where),
        "answer": check_text(row.get("answer"), "answer", where),
        "truth": "",
    }
