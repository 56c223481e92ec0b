"""Cold-start (SFT) data: SET-formatted answers in the shape of the authors' cold-start set,
as JSONL, a JSON array or parquet (--config.data.cold_start), each record flat (image, problem,
response) or a ShareGPT-style conversation (`messages`, as LLaMA-Factory writes them)."""

import functools
import json
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

SUFFIXES = (".jsonl", ".json", ".parquet")
_BOXED = "\\boxed{"
# ShareGPT-style records: the turns' key, and each turn's role and text keys, in the two
# spellings LLaMA-Factory reads (OpenAI's messages/role/content; ShareGPT's conversations/from/value).
_TURNS = ("messages", "conversations")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_IMAGE = "<image>"


def read_cold_start(path, labels: Sequence[str]) -> Iterator[dict]:
    """Records of cold-start (SFT) data: one .jsonl file, one .json file (an array of records),
    one .parquet file, or a directory of .parquet files (sorted), each row an image, its question
    and a SET-formatted response.

    Fields: `image` (or `images`, a list of one): in JSONL a path relative to the file's
    folder; in parquet encoded bytes, an HF {"bytes", "path"} struct (a path relative to the
    file's folder) or such a path string. `problem` (or `question`): the question ("" for the
    default question). `response`: the SET answer trained on, the record's `answer`. The label
    is the `label` field if present, else the response's last \\boxed{...}; it must be one of
    `labels`. `id`: the `id` field, else "<file stem>-<row index>".

    A ShareGPT-style record gives the question and response as a conversation instead (see
    `_from_turns`): {"messages": [{"role": "user", "content": "<image>Which emotion ..."},
    {"role": "assistant", "content": "<step1>...\\boxed{awe}"}], "images": ["img/1.jpg"]}.

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
        raise ValueError(
            f"cold-start data {path} must be a .jsonl, .json or .parquet file (or a directory of .parquet)"
        )
    else:
        files = [path]
    for file in (f for f in files if f.endswith(".parquet")):
        names = parquet_columns(file)
        if "response" not in names and not set(_TURNS) & set(names):
            raise ValueError(
                f"{file}: cold-start data has no field 'response' (the SET-formatted answer the cold start "
                f"trains on) nor 'messages' with an assistant turn (columns {names}); use data with SET responses, "
                "or unset --config.data.cold_start"
            )
        if "image" not in names and "images" not in names:
            raise ValueError(f"{file}: cold-start data has no field 'image' (or 'images'); columns {names}")
    return files


def _rows(file: str) -> Iterator[tuple[str, object]]:
    """(where, row) of each row of a .jsonl, .json or .parquet `file` (a line that is not JSON: a
    BadRecord). A .json file must hold one array: ValueError naming the file otherwise."""
    if file.endswith(".jsonl"):
        return annotation_rows(file)
    if file.endswith(".json"):
        try:
            rows = json.loads(epath.Path(file).read_bytes().decode("utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: cold-start data is not JSON ({e}); expected an array of records") from e
        if not isinstance(rows, list):
            raise ValueError(f"{file}: expected a JSON array of records, got a {type(rows).__name__}")
        return ((f"{file} record {i}", row) for i, row in enumerate(rows))
    return ((f"{file} row {i}", row) for i, row in enumerate(parquet_rows(file)))


def _record(where: str, row, default_id: str, root_real: str, labels: frozenset[str]) -> dict:
    if isinstance(row, BadRecord):
        raise row
    if not isinstance(row, dict):
        raise BadRecord(
            f"{where}: expected an object with `image`, `problem` and `response` (or `messages`), got {row!r:.80}"
        )
    rid = str(row["id"]) if row.get("id") not in (None, "") else default_id
    where = f"{where} (id {rid})"
    turns = next((row[k] for k in _TURNS if row.get(k) is not None), None)
    if turns is not None:
        row = {**row, **_from_turns(turns, where)}
    response = row.get("response")
    if not isinstance(response, str) or not response.strip():
        field = "'response'" if turns is None else "'response' (no assistant turn in its 'messages')"
        raise ValueError(
            f"{where}: cold-start record {rid!r} has no field {field} (the SET-formatted answer the cold "
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


def _from_turns(turns, where: str) -> dict:
    """{"problem", "response"} of a ShareGPT-style conversation: its one user turn, as written
    (the `<image>` placeholder kept where it stands, as in a `problem` field), and the assistant
    turn after it ("" when there is none: the caller's 'response' error). A turn is
    {"role" | "from": user | human | assistant | gpt, "content" | "value": text}; content may
    also be a list of parts ({"type": "text", "text"} or {"type": "image"}, which stands for
    `<image>`). BadRecord for anything else: a system turn (the prompt is the task's own), more
    than one question or answer, an unknown role, more than one image placeholder."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadRecord(f"{where}: expected 'messages' to be a list of turns {{role, content}}, got {turns!r:.80}")
    by_role = {"user": [], "assistant": [], "system": []}
    for i, turn in enumerate(turns):
        role = turn.get("role", turn.get("from"))
        if role not in _ROLES:
            raise BadRecord(f"{where}: turn {i} has role {role!r}, not one of {sorted(_ROLES)}")
        by_role[_ROLES[role]].append((i, _text(turn.get("content", turn.get("value")), f"{where} turn {i}")))
    if by_role["system"]:
        raise BadRecord(f"{where}: a system turn is not used (the prompt is the task's own); remove it")
    if len(by_role["user"]) != 1 or len(by_role["assistant"]) > 1:
        raise BadRecord(
            f"{where}: expected one user turn (the question) and one assistant turn (the SET answer), got "
            f"{len(by_role['user'])} and {len(by_role['assistant'])}"
        )
    (at, problem), answer = by_role["user"][0], by_role["assistant"]
    if problem.count(_IMAGE) > 1:
        raise BadRecord(f"{where}: the user turn has {problem.count(_IMAGE)} {_IMAGE} placeholders; one image only")
    if answer and answer[0][0] < at:
        raise BadRecord(f"{where}: the assistant turn comes before the user turn")
    return {"problem": problem, "response": answer[0][1] if answer else ""}


def _text(content, where: str) -> str:
    """A turn's text: a string, or a list of text and image parts joined (an image part as `<image>`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [_IMAGE if p.get("type") == "image" else p.get("text") for p in content]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise BadRecord(f"{where}: expected text content (a string or a list of text/image parts), got {content!r:.80}")


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
