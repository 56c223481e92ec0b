"""EmoSet-2k as Hugging Face `datasets` parquet (--config.data.source=emoset_parquet)."""

import functools
import re
from collections.abc import Iterator, Sequence

from etils import epath

from emor3_jax.data.sources.common import (
    BadRecord,
    Records,
    check_image,
    check_label,
    check_text,
    norm_labels,
    parquet_columns,
    parquet_rows,
)
from emor3_jax.data.sources.split_files import parquet_source_files

COLUMNS = ["images", "problem", "answer"]
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def label_from_answer(answer: str) -> str:
    """The label inside an EmoSet-2k answer: the text in <answer>...</answer> if present,
    else the whole answer; stripped of spaces and trailing '.'."""
    m = _ANSWER_TAG.search(answer)
    text = m.group(1) if m else answer
    return text.strip().rstrip(".").strip()


def read_emoset_parquet(path_or_dir, labels: Sequence[str]) -> Iterator[dict]:
    """Records from one parquet file, every *.parquet under a directory (sorted), or one split of
    a directory named `<dir>@<split>` (split_files: the hub's file naming; a directory holding
    several splits must be named so).

    HF `datasets` layout: `images` is a list of {"bytes", "path"} structs holding
    exactly one image; `problem` the question; `answer` the reference answer, whose
    label is `label_from_answer(answer)`. Other columns (`course_grained`) are
    ignored. `id` is "<file stem>-<row index within the file>".
    """
    labels = norm_labels(labels)
    files = parquet_source_files(str(path_or_dir))
    for file in files:
        names = parquet_columns(file)
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{file}: missing parquet columns {missing} (has {names})")

    def thunks():
        for file in files:
            for row_index, row in enumerate(parquet_rows(file, COLUMNS)):
                yield functools.partial(_record, file, row_index, row, labels)

    return Records(thunks())


def _record(file: str, row_index: int, row: dict, labels: frozenset[str]) -> dict:
    rid = f"{epath.Path(file).stem}-{row_index}"
    where = f"{file} row {row_index} (id {rid})"
    images = row["images"]
    if not isinstance(images, list) or len(images) != 1:
        n = len(images) if isinstance(images, list) else type(images).__name__
        raise BadRecord(f"{where}: expected `images` to hold exactly one image, got {n}")
    image = images[0]
    if not isinstance(image, dict) or image.get("bytes") is None:
        raise BadRecord(f"{where}: expected `images[0]` to be a struct with image `bytes`, got {image!r:.80}")
    answer = check_text(row["answer"], "answer", where)
    return {
        "id": rid,
        "image": check_image(image["bytes"], where),
        "label": check_label(label_from_answer(answer), labels, where),
        "problem": check_text(row["problem"], "problem", where),
        "answer": answer,
        "truth": "",
    }
