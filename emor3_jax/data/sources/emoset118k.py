"""The official EmoSet-118K release (--config.data.source=emoset118k)."""

import functools
import json
from collections.abc import Iterator, Sequence

from etils import epath

from emor3_jax.core import paths
from emor3_jax.data.sources.common import BadRecord, Records, check_label, data_root, norm_labels, read_image_file

SPLITS = ("train", "val", "test")


def read_emoset118k(root, split: str, labels: Sequence[str]) -> Iterator[dict]:
    """Records of one split of the EmoSet-118K release.

    Layout: `root/{train,val,test}.json` each hold a JSON list of
    [emotion, image_id, image_path, annotation_path], e.g.
    ["awe", "awe_00012", "image/awe/awe_00012.jpg", "annotation/awe/awe_00012.json"],
    paths relative to `root` (images in per-emotion folders). The per-image
    annotation JSON (scene, objects, ...) is not used. `problem` and `answer` are "".
    """
    if split not in SPLITS:
        raise ValueError(f"EmoSet-118K split must be one of {SPLITS}, got {split!r}")
    labels = norm_labels(labels)
    root_real = data_root(root)
    path = paths.join(root_real, f"{split}.json")
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"EmoSet-118K split list {path} does not exist")
    items = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of [emotion, image_id, image_path, annotation_path]")

    def thunks():
        for index, item in enumerate(items):
            yield functools.partial(_record, f"{path} item {index}", item, root_real, labels)

    return Records(thunks())


def _record(where: str, item, root_real: str, labels: frozenset[str]) -> dict:
    if not (isinstance(item, list) and len(item) >= 3 and all(isinstance(x, str) for x in item[:3])):
        raise BadRecord(f"{where}: expected [emotion, image_id, image_path, annotation_path], got {item!r:.120}")
    emotion, image_id, image_path = item[:3]
    where = f"{where} (id {image_id})"
    return {
        "id": image_id,
        "image": read_image_file(root_real, image_path, where),
        "label": check_label(emotion, labels, where),
        "problem": "",
        "answer": "",
        "truth": "",
    }
