"""Cold-start (SFT) data: SET-formatted answers in the shape of the authors' cold-start set,
as JSONL or parquet (--config.data.cold_start)."""

import functools
from collections.abc import Iterator, Sequence

from etils import epath

from emor3_jax.core import paths
from emor3_jax.data.sources.common import (
    BadRecord,
    Records,
    annotation_rows,
    check_image,
    check_label,
    check_text,
    norm_labels,
    parquet_columns,
    parquet_files,
    parquet_rows,
    read_image_file,
)

SUFFIXES = (".jsonl", ".parquet")
_BOXED = "\\boxed{"


def read_cold_start(path, labels: Sequence[str]) -> Iterator[dict]:
    """Records of cold-start (SFT) data: one .jsonl file, one .parquet file, or a directory of
    .parquet files (sorted), each row an image, its question and a SET-formatted response.

    Fields: `image` (or `images`, a list of one): in JSONL a path relative to the file's
    folder; in parquet encoded bytes, an HF {"bytes", "path"} struct (a path relative to the
    file's folder) or such a path string. `problem` (or `question`): the question ("" for the
    default question). `response`: the SET answer trained on, the record's `answer`. The label
    is the `label` field if present, else the response's last \\boxed{...}; it must be one of
    `labels`. `id`: the `id` field, else "<file stem>-<row index>".

    A row without a non-empty string `response` raises ValueError (not BadRecord: it is
    never skipped) naming the field and the record, so a cold start never trains on bare
    labels; whether the response is SET-formatted is checked by `require_set_answers`.
    """
    labels = norm_labels(labels)
    files = _files(str(path))

    def thunks():
        for file in files:
            stem, root_real = epath.Path(file).stem, paths.resolve(paths.parent(paths.absolute(file)))[0]
            for index, (where, row) in enumerate(_rows(file)):
                yield functools.partial(_record, where, row, f"{stem}-{index}", root_real, labels)

    return Records(thunks())


def _files(path: str) -> list[str]:
    """The data files at `path`; each parquet file is checked for a response and an image column."""
    if epath.Path(path).is_dir():
        files = parquet_files(path)
    elif not epath.Path(path).is_file():
        raise FileNotFoundError(f"cold-start data {path} does not exist")
    elif not path.endswith(SUFFIXES):
        raise ValueError(f"cold-start data {path} must be a .jsonl or .parquet file (or a directory of .parquet)")
    else:
        files = [path]
    for file in (f for f in files if f.endswith(".parquet")):
        names = parquet_columns(file)
        if "response" not in names:
            raise ValueError(
                f"{file}: cold-start data has no field 'response' (the SET-formatted answer the cold start "
                f"trains on; columns {names}); use data with SET responses, or unset --config.data.cold_start"
            )
        if "image" not in names and "images" not in names:
            raise ValueError(f"{file}: cold-start data has no field 'image' (or 'images'); columns {names}")
    return files


def _rows(file: str) -> Iterator[tuple[str, object]]:
    """(where, row) of each row of a .jsonl or .parquet `file` (a line that is not JSON: a BadRecord)."""
    if file.endswith(".jsonl"):
        return annotation_rows(file)
    return ((f"{file} row {i}", row) for i, row in enumerate(parquet_rows(file)))


def _record(where: str, row, default_id: str, root_real: str, labels: frozenset[str]) -> dict:
    if isinstance(row, BadRecord):
        raise row
    if not isinstance(row, dict):
        raise BadRecord(f"{where}: expected an object with `image`, `problem` and `response`, got {row!r:.80}")
    rid = str(row["id"]) if row.get("id") not in (None, "") else default_id
    where = f"{where} (id {rid})"
    response = row.get("response")
    if not isinstance(response, str) or not response.strip():
        raise ValueError(
            f"{where}: cold-start record {rid!r} has no field 'response' (the SET-formatted answer the cold "
            f"start trains on), got {response!r:.80}; use data with SET responses, or unset "
            "--config.data.cold_start"
        )
    image = row.get("image") if row.get("image") is not None else row.get("images")
    if image is None:
        raise BadRecord(f"{where}: missing required field 'image' (or 'images')")
    label = row.get("label") or _last_boxed(response)
    if not label:
        raise BadRecord(f"{where}: no `label` field and no \\boxed{{label}} in its response {response[-80:]!r}")
    problem = row.get("problem") if row.get("problem") is not None else row.get("question")
    return {
        "id": rid,
        "image": _image(image, root_real, where),
        "label": check_label(label, labels, where),
        "problem": check_text(problem, "problem", where),
        "answer": response,
        "truth": "",
    }


def _image(value, root_real: str, where: str) -> bytes:
    """The image of one row: a path relative to the data file's folder (JSONL, or a parquet
    string), encoded bytes, a {"bytes", "path"} struct (HF `datasets`), or a list holding
    exactly one of those (the `images` column)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRecord(f"{where}: expected exactly one image, got {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return check_image(value, where)
    if isinstance(value, str):
        return read_image_file(root_real, value, where)
    raise BadRecord(
        f"{where}: expected an image path relative to the data file's folder or image bytes, got {value!r:.80}"
    )


def _last_boxed(text: str) -> str:
    """The content of the last `\\boxed{...}` of `text` (nested braces counted), "" if none."""
    start = text.rfind(_BOXED)
    if start == -1:
        return ""
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return ""
