"""Readers that turn image-emotion data sets on disk into RECORDS.

A RECORD is a dict:

  {"id": str, "image": bytes, "label": str, "problem": str, "answer": str, "truth": str}

`image` is the encoded image file exactly as stored (PNG, JPEG, or any format
PIL decodes); `label` is lower case and one of the caller's `labels`;
`problem` is the question text ("" if the source has none); `answer` is the
source's reference answer ("" if none); `truth` is what the source knows of the image
beyond its label, as JSON: the synthetic set's drawn figure and what its answer says
(synthetic.make_example), "" for every real data set (the readers below).

Readers:
  read_emoset_parquet(path_or_dir, labels)        EmoSet-2k, HF `datasets` parquet
  read_folder(root, annotations_file, labels)     images under root + JSONL/CSV
  read_emoset118k(root, split, labels)            the official EmoSet-118K release
  read_cold_start(path, labels)                   SET-answer SFT data (JSONL or parquet):
                                                  image, problem/question, response

Each reader checks the top level (files present, columns present) when called
and raises ValueError / FileNotFoundError then. Each record is read and checked
when it is drawn; a bad one raises `BadRecord` naming the file, row and id.
The iterator stays usable after a `BadRecord`, so `checked(...)` can skip bad
records and go on:

  records = checked(read_folder(root, "ann.jsonl", LABELS), skip_bad=True,
                    max_bad_fraction=0.01, counter={})

Every path may be local or a URI (gs://...): files are read through epath (core/paths).
"""

import csv
import io
import json
import logging
import re
import types
from collections.abc import Callable, Iterable, Iterator, Sequence

from etils import epath
from PIL import Image

from emor3_jax.core import paths

log = logging.getLogger(__name__)

RECORD_KEYS = ("id", "image", "label", "problem", "answer", "truth")
EMOSET118K_SPLITS = ("train", "val", "test")
# `checked` applies the bad-fraction limit only once this many records were seen.
MIN_SEEN_FOR_LIMIT = 20

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


class BadRecord(ValueError):
    """One record that cannot be used; the message names the record and what was expected."""


class _Records:
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
# Checks shared by the readers.


def _norm_labels(labels: Sequence[str]) -> frozenset[str]:
    if isinstance(labels, str) or not labels:
        raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
    return frozenset(str(x).strip().lower() for x in labels)


def _check_label(label, labels: frozenset[str], where: str) -> str:
    if not isinstance(label, str):
        raise BadRecord(f"{where}: label must be a string, got {type(label).__name__} {label!r}")
    norm = label.strip().lower()
    if norm not in labels:
        raise BadRecord(f"{where}: label {label!r} is not one of {sorted(labels)}")
    return norm


def _check_image(data, where: str) -> bytes:
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


def _read_image_file(root_real: str, rel_path, where: str) -> bytes:
    """Reads `rel_path` under the data root; refuses paths that leave the root."""
    if not isinstance(rel_path, str) or not rel_path:
        raise BadRecord(f"{where}: expected a non-empty image path, got {rel_path!r}")
    full, inside = paths.resolve(root_real, rel_path)  # `..` and (local) symlinks resolved
    if not inside:
        raise BadRecord(f"{where}: image path {rel_path!r} resolves to {full}, outside the data root {root_real}")
    if not epath.Path(full).is_file():
        raise BadRecord(f"{where}: image file {full} does not exist")
    return _check_image(epath.Path(full).read_bytes(), f"{where} ({full})")


def _text(value, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _root(root) -> str:
    root_real, _ = paths.resolve(root)  # a local root with its symlinks resolved
    if not epath.Path(root_real).is_dir():
        raise FileNotFoundError(f"data root {root} is not a directory")
    return root_real


# ---------------------------------------------------------------------------
# EmoSet-2k (HF parquet).


def label_from_answer(answer: str) -> str:
    """The label inside an EmoSet-2k answer: the text in <answer>...</answer> if present,
    else the whole answer; stripped of spaces and trailing '.'."""
    m = _ANSWER_TAG.search(answer)
    text = m.group(1) if m else answer
    return text.strip().rstrip(".").strip()


def _parquet_files(path_or_dir) -> list[str]:
    path = epath.Path(path_or_dir)
    if path.is_dir():
        files = [f for f in paths.files(path) if f.endswith(".parquet")]
        if not files:
            raise FileNotFoundError(f"no .parquet files under {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"parquet file {path} does not exist")
    return [str(path)]


def _parquet_columns(file: str) -> list[str]:
    import pyarrow.parquet as pq

    with epath.Path(file).open("rb") as f:
        return pq.ParquetFile(f).schema_arrow.names


def _parquet_rows(file: str, columns: list[str] | None = None) -> Iterator[dict]:
    """The rows of parquet `file` (local or a URI), read 64 at a time."""
    import pyarrow.parquet as pq

    with epath.Path(file).open("rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=columns):
            yield from batch.to_pylist()


def read_emoset_parquet(path_or_dir, labels: Sequence[str]) -> Iterator[dict]:
    """Records from one parquet file or every *.parquet under a directory (sorted).

    HF `datasets` layout: `images` is a list of {"bytes", "path"} structs holding
    exactly one image; `problem` the question; `answer` the reference answer, whose
    label is `label_from_answer(answer)`. Other columns (`course_grained`) are
    ignored. `id` is "<file stem>-<row index within the file>".
    """
    labels = _norm_labels(labels)
    files = _parquet_files(path_or_dir)
    columns = ["images", "problem", "answer"]
    for file in files:
        names = _parquet_columns(file)
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{file}: missing parquet columns {missing} (has {names})")

    def row_record(file: str, row_index: int, row: dict) -> dict:
        rid = f"{epath.Path(file).stem}-{row_index}"
        where = f"{file} row {row_index} (id {rid})"
        images = row["images"]
        if not isinstance(images, list) or len(images) != 1:
            n = len(images) if isinstance(images, list) else type(images).__name__
            raise BadRecord(f"{where}: expected `images` to hold exactly one image, got {n}")
        image = images[0]
        if not isinstance(image, dict) or image.get("bytes") is None:
            raise BadRecord(f"{where}: expected `images[0]` to be a struct with image `bytes`, got {image!r:.80}")
        answer = _text(row["answer"], "answer", where)
        return {
            "id": rid,
            "image": _check_image(image["bytes"], where),
            "label": _check_label(label_from_answer(answer), labels, where),
            "problem": _text(row["problem"], "problem", where),
            "answer": answer,
            "truth": "",
        }

    def thunks():
        for file in files:
            for row_index, row in enumerate(_parquet_rows(file, columns)):
                yield lambda f=file, i=row_index, r=row: row_record(f, i, r)

    return _Records(thunks())


# ---------------------------------------------------------------------------
# A folder of images plus a JSONL or CSV annotation file.


def _annotation_rows(path: str) -> Iterator[tuple[str, object]]:
    """Yields (where, row): row is the parsed line/row, or a BadRecord for a line that is not JSON."""
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
    else:  # .csv (read_folder checked the suffix)
        for row_no, row in enumerate(csv.DictReader(text), 1):
            yield f"{path} row {row_no}", row


def read_folder(root, annotations_file, labels: Sequence[str]) -> Iterator[dict]:
    """Records from images under `root` listed in a JSONL or CSV annotations file.

    Columns: `image` (path relative to `root`), `label`; optional `problem`,
    `answer` (default ""), `id` (default: the image path). A relative
    `annotations_file` is taken from the working directory, not from `root`.
    """
    labels = _norm_labels(labels)
    root_real = _root(root)
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

    def row_record(where: str, row) -> dict:
        if isinstance(row, BadRecord):
            raise row
        if not isinstance(row, dict):
            raise BadRecord(f"{where}: expected an object with `image` and `label`, got {row!r:.80}")
        for key in ("image", "label"):
            if not row.get(key):
                raise BadRecord(f"{where}: missing required field {key!r} (row {row!r:.120})")
        rid = _text(row.get("id") or row["image"], "id", where)
        where = f"{where} (id {rid})"
        return {
            "id": rid,
            "image": _read_image_file(root_real, row["image"], where),
            "label": _check_label(row["label"], labels, where),
            "problem": _text(row.get("problem"), "problem", where),
            "answer": _text(row.get("answer"), "answer", where),
            "truth": "",
        }

    def thunks():
        for where, row in _annotation_rows(path):
            yield lambda w=where, r=row: row_record(w, r)

    return _Records(thunks())


# ---------------------------------------------------------------------------
# EmoSet-118K official release.


def read_emoset118k(root, split: str, labels: Sequence[str]) -> Iterator[dict]:
    """Records of one split of the EmoSet-118K release.

    Layout: `root/{train,val,test}.json` each hold a JSON list of
    [emotion, image_id, image_path, annotation_path], e.g.
    ["awe", "awe_00012", "image/awe/awe_00012.jpg", "annotation/awe/awe_00012.json"],
    paths relative to `root` (images in per-emotion folders). The per-image
    annotation JSON (scene, objects, ...) is not used. `problem` and `answer` are "".
    """
    if split not in EMOSET118K_SPLITS:
        raise ValueError(f"EmoSet-118K split must be one of {EMOSET118K_SPLITS}, got {split!r}")
    labels = _norm_labels(labels)
    root_real = _root(root)
    path = paths.join(root_real, f"{split}.json")
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"EmoSet-118K split list {path} does not exist")
    items = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of [emotion, image_id, image_path, annotation_path]")

    def item_record(index: int, item) -> dict:
        where = f"{path} item {index}"
        if not (isinstance(item, list) and len(item) >= 3 and all(isinstance(x, str) for x in item[:3])):
            raise BadRecord(f"{where}: expected [emotion, image_id, image_path, annotation_path], got {item!r:.120}")
        emotion, image_id, image_path = item[:3]
        where = f"{where} (id {image_id})"
        return {
            "id": image_id,
            "image": _read_image_file(root_real, image_path, where),
            "label": _check_label(emotion, labels, where),
            "problem": "",
            "answer": "",
            "truth": "",
        }

    def thunks():
        for index, item in enumerate(items):
            yield lambda i=index, it=item: item_record(i, it)

    return _Records(thunks())


# ---------------------------------------------------------------------------
# Cold-start data: SET-formatted answers (the shape of the authors' cold-start set).

COLD_START_SUFFIXES = (".jsonl", ".parquet")
_BOXED = "\\boxed{"


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


def _cold_start_image(value, root_real: str | None, where: str) -> bytes:
    """The image of one cold-start row: a path relative to the data file's folder (JSONL, or a
    parquet string), encoded bytes, a {"bytes", "path"} struct (HF `datasets`), or a list
    holding exactly one of those (the `images` column)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRecord(f"{where}: expected exactly one image, got {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return _check_image(value, where)
    if isinstance(value, str) and root_real is not None:
        return _read_image_file(root_real, value, where)
    raise BadRecord(
        f"{where}: expected an image path relative to the data file's folder or image bytes, got {value!r:.80}"
    )


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
    labels = _norm_labels(labels)
    path = str(path)
    if epath.Path(path).is_dir():
        files = _parquet_files(path)
    elif not epath.Path(path).is_file():
        raise FileNotFoundError(f"cold-start data {path} does not exist")
    elif not path.endswith(COLD_START_SUFFIXES):
        raise ValueError(f"cold-start data {path} must be a .jsonl or .parquet file (or a directory of .parquet)")
    else:
        files = [path]
    for file in files:
        if file.endswith(".parquet"):
            names = _parquet_columns(file)
            if "response" not in names:
                raise ValueError(
                    f"{file}: cold-start data has no field 'response' (the SET-formatted answer the cold start "
                    f"trains on; columns {names}); use data with SET responses, or unset --config.data.cold_start"
                )
            if "image" not in names and "images" not in names:
                raise ValueError(f"{file}: cold-start data has no field 'image' (or 'images'); columns {names}")

    def row_record(file: str, index: int, where: str, row) -> dict:
        if isinstance(row, BadRecord):
            raise row
        if not isinstance(row, dict):
            raise BadRecord(f"{where}: expected an object with `image`, `problem` and `response`, got {row!r:.80}")
        rid = row.get("id")
        rid = str(rid) if rid not in (None, "") else f"{epath.Path(file).stem}-{index}"
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
            "image": _cold_start_image(image, paths.resolve(paths.parent(paths.absolute(file)))[0], where),
            "label": _check_label(label, labels, where),
            "problem": _text(problem, "problem", where),
            "answer": response,
            "truth": "",
        }

    def rows(file: str) -> Iterator[tuple[str, object]]:
        if file.endswith(".jsonl"):
            yield from _annotation_rows(file)
            return
        for i, row in enumerate(_parquet_rows(file)):
            yield f"{file} row {i}", row

    def thunks():
        for file in files:
            for index, (where, row) in enumerate(rows(file)):
                yield lambda f=file, i=index, w=where, r=row: row_record(f, i, w, r)

    return _Records(thunks())


# ---------------------------------------------------------------------------
# Skipping bad records.


def checked(records: Iterable[dict], skip_bad: bool, max_bad_fraction: float, counter: dict) -> Iterator[dict]:
    """Passes records through; counts, and optionally skips, those that raise BadRecord.

    With `skip_bad` False the first BadRecord is re-raised. With True it is logged
    and skipped. `counter["seen"]` counts every record drawn (good and bad),
    `counter["bad"]` the skipped ones. The rule: once at least
    MIN_SEEN_FOR_LIMIT (20) records were seen, and again at the end of the stream
    whatever the count, a bad/seen above `max_bad_fraction` raises RuntimeError
    naming the fraction and the limit (so a broken data set stops early instead
    of training on what little is left).

    Skipping needs a reader from this module (or any iterator that stays usable
    after raising); a plain generator ends on its first exception, so skipping
    inside one raises TypeError instead of silently dropping the rest.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    counter.setdefault("seen", 0)
    counter.setdefault("bad", 0)

    def over_limit() -> bool:
        return counter["seen"] > 0 and counter["bad"] / counter["seen"] > max_bad_fraction

    def fail(last: BadRecord):
        raise RuntimeError(
            f"too many bad records: {counter['bad']} of {counter['seen']} seen "
            f"({counter['bad'] / counter['seen']:.1%}) exceeds max_bad_fraction={max_bad_fraction}; last: {last}. "
            "Fix or remove those records, or allow more with --config.data.max_bad_fraction"
        )

    it = iter(records)
    last_bad = None
    while True:
        try:
            record = next(it)
        except StopIteration:
            break
        except BadRecord as e:
            if not skip_bad:
                raise
            if isinstance(it, types.GeneratorType):
                raise TypeError(
                    "cannot skip a bad record inside a generator (it has ended); "
                    "read through emor3_jax.data.sources readers"
                ) from e
            counter["seen"] += 1
            counter["bad"] += 1
            last_bad = e
            log.warning("skipping bad record: %s", e)
            if counter["seen"] >= MIN_SEEN_FOR_LIMIT and over_limit():
                fail(e)
            continue
        counter["seen"] += 1
        if last_bad is not None and counter["seen"] >= MIN_SEEN_FOR_LIMIT and over_limit():
            fail(last_bad)
        yield record
    if last_bad is not None and over_limit():
        fail(last_bad)


# ---------------------------------------------------------------------------
# Dropping prompts over the length limit.


def drop_overlong(
    records: Iterable[dict], prompt_length: Callable[[dict], tuple[int, int, int]], limit: int, dropped: list
) -> Iterator[dict]:
    """Passes the records whose prompt fits `limit` tokens (the official run's
    filter_overlong_prompts: a long prompt is dropped when the data set is built, it does not
    stop the run). `prompt_length(record)` gives (prompt tokens, image tokens, image tokens at
    min_pixels); each dropped record is appended to `dropped` as {"id", "tokens",
    "image_tokens", "too_large_at_min_pixels"} (True: its prompt would not fit even with the
    image at data.min_pixels) and logged by id."""
    for record in records:
        tokens, image, at_min = prompt_length(record)
        if tokens <= limit:
            yield record
            continue
        at_min_too_large = tokens - image + at_min > limit
        dropped.append(
            {"id": record["id"], "tokens": tokens, "image_tokens": image, "too_large_at_min_pixels": at_min_too_large}
        )
        why = f"; even at data.min_pixels its image takes {at_min} tokens" if at_min_too_large else ""
        log.warning(
            "dropping record %r: its prompt has %d tokens > rl.max_prompt_len=%d%s", record["id"], tokens, limit, why
        )


def require_set_answers(records: Iterable[dict], is_set_answer: Callable[[str], bool], field: str) -> Iterator[dict]:
    """Passes records whose `answer` (read from the source's `field`) is a SET-formatted answer
    (`is_set_answer`, e.g. rewards.format_score); the first one that is not stops the build
    naming the record and the field, so a cold start never trains on bare labels."""
    for record in records:
        if record["answer"] and not is_set_answer(record["answer"]):  # none at all: the trainer counts those
            raise ValueError(
                f"record {record['id']!r}: field {field!r} is not a SET answer (<step1>..</step1><step2>..</step2>"
                f"<step3>..</step3> then \\boxed{{label}}), got {record['answer'][:80]!r}; the cold start would "
                "train on it: use data with SET answers, or --config.cold_start.steps=0"
            )
        yield record
