"""What every source reader shares: the record's keys, the BadRecord error and the iterator
that survives one, label/text/image checks, path checks under a data root, and the two file
formats more than one source reads (parquet; JSONL or CSV annotations).

Every path may be local or a URI (gs://...): files are read through epath (core/paths).
"""

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence

from etils import epath
from PIL import Image

from emor3_jax.core import paths

RECORD_KEYS = ("id", "image", "label", "problem", "answer", "truth")


class BadRecord(ValueError):
    """One record that cannot be used; the message names the record and what was expected."""


class Records:
    """An iterator of records that stays usable after one of them raises BadRecord.

    `thunks` yields one zero-argument function per record; calling it reads and
    checks that record. The thunk stream advances before the record is built, so
    the next `next()` after a BadRecord goes on with the following record.
    """

    def __init__(self, thunks: Iterator[Callable[[], dict]]):
        self._thunks = thunks

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._thunks)()


# ---------------------------------------------------------------------------
# Field checks.


def norm_labels(labels: Sequence[str]) -> frozenset[str]:
    if isinstance(labels, str) or not labels:
        raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
    return frozenset(str(x).strip().lower() for x in labels)


def check_label(label, labels: frozenset[str], where: str) -> str:
    if not isinstance(label, str):
        raise BadRecord(f"{where}: label must be a string, got {type(label).__name__} {label!r}")
    norm = label.strip().lower()
    if norm not in labels:
        raise BadRecord(f"{where}: label {label!r} is not one of {sorted(labels)}")
    return norm


def check_text(value, field: str, where: str) -> str:
    """`value` as the record's text field ("" for None); anything but a string is a BadRecord."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def check_image(data, where: str) -> bytes:
    """Returns `data` if it is a whole image PIL can decode, else raises BadRecord."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadRecord(
            f"{where}: expected encoded image bytes, got {type(data).__name__} of length "
            f"{len(data) if hasattr(data, '__len__') else '?'}"
        )
    data = bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums; leaves the image unusable
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: catches truncated pixel data
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise BadRecord(f"{where}: image is not a readable image file ({type(e).__name__}: {e})") from e
    return data


# ---------------------------------------------------------------------------
# Paths under a data root.


def data_root(root) -> str:
    """`root` with its (local) symlinks resolved; FileNotFoundError if it is not a directory."""
    root_real, _ = paths.resolve(root)
    if not epath.Path(root_real).is_dir():
        raise FileNotFoundError(f"data root {root} is not a directory")
    return root_real


def read_image_file(root_real: str, rel_path, where: str) -> bytes:
    """Reads `rel_path` under the data root; refuses paths that leave the root."""
    if not isinstance(rel_path, str) or not rel_path:
        raise BadRecord(f"{where}: expected a non-empty image path, got {rel_path!r}")
    full, inside = paths.resolve(root_real, rel_path)  # `..` and (local) symlinks resolved
    if not inside:
        raise BadRecord(f"{where}: image path {rel_path!r} resolves to {full}, outside the data root {root_real}")
    if not epath.Path(full).is_file():
        raise BadRecord(f"{where}: image file {full} does not exist")
    return check_image(epath.Path(full).read_bytes(), f"{where} ({full})")


# ---------------------------------------------------------------------------
# File formats: parquet, and JSONL / CSV annotations.


def parquet_files(path_or_dir) -> list[str]:
    """[path_or_dir] for one file, or every *.parquet under a directory (sorted)."""
    path = epath.Path(path_or_dir)
    if path.is_dir():
        files = [f for f in paths.files(path) if f.endswith(".parquet")]
        if not files:
            raise FileNotFoundError(f"no .parquet files under {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"parquet file {path} does not exist")
    return [str(path)]


def parquet_columns(file: str) -> list[str]:
    import pyarrow.parquet as pq

    with epath.Path(file).open("rb") as f:
        return pq.ParquetFile(f).schema_arrow.names


def parquet_rows(file: str, columns: list[str] | None = None) -> Iterator[dict]:
    """The rows of parquet `file` (local or a URI), read 64 at a time."""
    import pyarrow.parquet as pq

    with epath.Path(file).open("rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=columns):
            yield from batch.to_pylist()


def annotation_rows(path: str) -> Iterator[tuple[str, object]]:
    """Yields (where, row): row is the parsed line/row, or a BadRecord for a line that is not JSON.
    `path` ends in .jsonl or .csv (the caller checked the suffix)."""
    text = io.StringIO(epath.Path(path).read_bytes().decode("utf-8"), newline="")  # lines end as stored
    if path.endswith(".jsonl"):
        for line_no, line in enumerate(text, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRecord(f"{where}: expected one JSON object per line ({e})")
    else:
        for row_no, row in enumerate(csv.DictReader(text), 1):
            yield f"{path} row {row_no}", row
