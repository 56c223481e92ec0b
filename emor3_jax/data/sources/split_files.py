"""The files of one split of a parquet data set folder, named `<folder>@<split>` as the official
EasyR1 config names its data (`fuyyy74/EmoSet2k@train`; verl/utils/dataset.py:131-146 splits the
value at "@" and loads that split with the `datasets` library).

A folder holding several splits (a hub snapshot keeps `data/train-00000-of-00001.parquet` and
`data/test-00000-of-00001.parquet` side by side) gives each split its files by the hub's naming
conventions: the `datasets` library's default data files (datasets/data_files.py,
`_get_data_files_patterns`), for a repo whose card declares none. The first rule that matches
any file of the folder decides every split:

  1. sharded: `data/<split>-NNNNN-of-NNNNN*.*` (what `push_to_hub` writes; any split name)
  2. a folder named for the split: `train/x.parquet`, `data/test-2k/x.parquet`, `my_val/x.parquet`
  3. a file named for the split: `train.parquet`, `data/test-0.parquet`, `emoset_val.parquet`
  4. none of these: every file is the train split

"Named for" a split: one of its keywords (KEYWORDS) alone, or set off by one of `-._ ` or a digit
(`training` is train, `trainset` is nothing). Names are case-sensitive. Hidden files and folders
(`.git`, `.cache`), folders named `__x` and the card files datasets ignores (README.md, ...) belong
to no split. Our own matcher over the listed files, not `datasets` itself (not a dependency).
"""

import re

from etils import epath

from emor3_jax.core import paths
from emor3_jax.data.sources.common import parquet_files

# datasets' split keywords (data_files.SPLIT_KEYWORDS), each under its split's canonical name.
KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = "[-._ 0-9]"  # datasets' NON_WORDS_CHARS, a glob character class there too
_SHARDED = re.compile(r"^data/(?P<split>[^/]+)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*$")
_SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")  # datasets' naming._split_re
_IGNORED = frozenset(
    ("README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip", "dataset_dict.json")
)  # datasets' FILES_TO_IGNORE


def _dir_rule(keyword: str) -> re.Pattern:
    """A folder name for `keyword`: the keyword alone, or with separators on the sides it has
    neighbours (datasets' four KEYWORDS_IN_DIR_NAME_BASE_PATTERNS)."""
    return re.compile(rf"^(?:.*{_SEP})?{keyword}(?:{_SEP}.*)?$")


def _file_rule(keyword: str) -> re.Pattern:
    """A file name for `keyword`: the keyword first or after a separator, and a separator after
    it (datasets' two KEYWORDS_IN_FILENAME_BASE_PATTERNS)."""
    return re.compile(rf"^(?:.*{_SEP})?{keyword}{_SEP}.*$")


def parse(value: str) -> tuple[str, str | None]:
    """(path, split) of `<path>@<split>`; (value, None) when `value` names no split: it has no
    "@", it exists as it is (a folder may have "@" in its name), or what follows the last "@"
    is not a split name (`\\w+(\\.\\w+)*`, datasets' rule)."""
    path, at, split = value.rpartition("@")
    if not at or not path or not _SPLIT_NAME.match(split) or epath.Path(value).exists():
        return value, None
    return path, split


def _relative_files(root: str) -> list[str]:
    """The files under `root`, relative and "/"-separated, less those datasets never takes."""
    out = []
    for full in paths.files(root):
        rel = full[len(root.rstrip("/")) + 1 :]
        parts = rel.split("/")
        hidden = any(p.startswith(".") for p in parts) or any(p.startswith("__") for p in parts[:-1])
        if not hidden and parts[-1] not in _IGNORED:
            out.append(rel)
    return out


def splits(files: list[str]) -> dict[str, list[str]]:
    """{split: its files} of a folder's `files` (relative, "/"-separated), by the first of the
    module docstring's rules that matches any of them; splits without files are left out."""
    sharded = {}
    for f in files:
        m = _SHARDED.match(f)
        if m:
            sharded.setdefault(m["split"], []).append(f)
    if sharded:
        return sharded
    for rule, names in ((_dir_rule, lambda f: f.split("/")[:-1]), (_file_rule, lambda f: f.split("/")[-1:])):
        found = {}
        for split, keywords in KEYWORDS.items():
            patterns = [rule(k) for k in keywords]
            hits = [f for f in files if any(p.match(n) for p in patterns for n in names(f))]
            if hits:
                found[split] = hits
        if found:
            return found
    return {"train": list(files)} if files else {}


def split_files(root: str, split: str) -> list[str]:
    """The .parquet files (sorted) of split `split` of folder `root` (or of the one file `root`,
    which is the train split alone, as datasets has it). FileNotFoundError naming the splits
    the folder has when `split` is not one of them or has no .parquet file."""
    if epath.Path(root).is_file():
        if split != "train":
            raise FileNotFoundError(f"{root}@{split}: a single data file is the train split alone; use {root}@train")
        return [root]
    if not epath.Path(root).is_dir():
        raise FileNotFoundError(f"{root} does not exist (the folder of {root}@{split})")
    found = splits(_relative_files(root))
    if split not in found:
        raise FileNotFoundError(
            f"{root} has no files of split {split!r} by the hub's file naming (it has "
            f"{sorted(found) or 'no data files'}; see emor3_jax/data/sources/split_files.py)"
        )
    parquet = sorted(f for f in found[split] if f.endswith(".parquet"))
    if not parquet:
        raise FileNotFoundError(f"{root}@{split}: the split's files {found[split][:3]} include no .parquet file")
    return [paths.join(root, f) for f in parquet]


def parquet_source_files(value: str) -> list[str]:
    """The .parquet files `value` names: `<folder or file>@<split>` (split_files), one .parquet
    file, or a folder read whole. ValueError for a folder whose files the hub's naming gives to
    more than one split (reading it whole would mix them, e.g. train with test), naming the
    `@<split>` spellings to use instead; FileNotFoundError for what does not exist."""
    path, split = parse(value)
    if split is not None:
        return split_files(path, split)
    if epath.Path(value).is_dir():
        found = splits(_relative_files(value))
        if len(found) > 1:
            raise ValueError(
                f"{value} holds the files of {len(found)} splits {sorted(found)} (by the hub's file naming); "
                f"reading it whole would mix them: name one, e.g. {value}@{sorted(found)[-1]}"
            )
    return parquet_files(value)
