"""The records of an evaluation data set.

A RECORD is {"id", "image" (encoded bytes), "label", "problem", "answer", "truth"} (see
data/sources).

An evaluation data set (`config.eval.datasets.<name>`) is {source, path, annotations, split,
labels, num_examples}; `load_eval_records` gives its records as a plain list, on every
process the same (a multi-host caller shards the list).
"""

from __future__ import annotations

import itertools

from ml_collections import ConfigDict

from emor3_jax.data import sources


def load_eval_records(ds: ConfigDict, c: ConfigDict, counter: dict) -> list[dict]:
    """The first `ds.num_examples` records (0: all) of evaluation data set `ds`.

    Bad records are skipped and counted in `counter` as `c.data.skip_bad` and
    `c.data.max_bad_fraction` say; synthetic records use `c.seed`, `c.data.image_size`,
    `c.data.image_sides` and `c.data.synthetic_detail`.
    """
    records = sources.read_split(
        ds.source,
        ds.path,
        ds.annotations,
        ds.split,
        list(ds.labels),
        count=ds.num_examples,
        seed=c.seed,
        image_size=c.data.image_size,
        image_sides=tuple(c.data.image_sides),
        synthetic_detail=c.data.synthetic_detail if ds.source == "synthetic" else "size",
    )
    if ds.source != "synthetic":  # generated records cannot be bad
        records = sources.checked(records, c.data.skip_bad, c.data.max_bad_fraction, counter)
    return list(itertools.islice(records, ds.num_examples or None))
