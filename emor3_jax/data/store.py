"""The run's data store: both splits written once to ArrayRecord files in the workdir (a
tensorflow-datasets builder), read back with grain, each process its block of every global
batch (the blocks in process order are what one process reads).

ArrayRecord reads and writes local files only: with the workdir at a URI (gs://...) process 0
builds the store in its scratch directory (--config.scratch_dir) and uploads it to
workdir/data, and every process reads a copy in its own scratch directory (the whole data set
on each host's local disk)."""

from __future__ import annotations

import jax
from etils import epath
from ml_collections import ConfigDict

from emor3_jax.core import multihost, paths
from emor3_jax.data import pipeline, sources, tfds_builder
from emor3_jax.data.sources.overlap import ImageOverlap

NAME = "emotions"


def cold_start_split(c: ConfigDict) -> str:
    """The split the cold start trains on: "cold_start" (data.cold_start's records) when
    data.cold_start is set, else "train"."""
    return "cold_start" if c.data.cold_start else "train"


def build(
    c: ConfigDict,
    prompt_length=None,
    dropped: dict | None = None,
    is_set_answer=None,
    scratch: paths.Scratch | None = None,
) -> tuple[str, dict]:
    """ArrayRecord files of both splits (built once per workdir): their local directory (the
    workdir's, or its copy in `scratch`, required then, for a URI workdir), and the records
    seen / skipped as bad per split while building.

    With `prompt_length` (record -> (prompt tokens, image tokens, image tokens at min_pixels),
    e.g. EmoR3.prompt_length) records whose prompt exceeds rl.max_prompt_len are dropped and
    listed per split in `dropped` ({split: [sources.drop_overlong entries]}). With
    `is_set_answer` (answer -> truthy, e.g. rewards.format_score) and cold_start.steps > 0, a
    cold-start record whose `answer` is not a SET answer stops the build naming the field. Real
    data whose test split has an image identical to a train image stops the build naming how many
    and which (sources.overlap.ImageOverlap), unless data.allow_train_test_overlap.

    With data.cold_start set (sources.read_cold_start: JSONL/parquet of image, problem,
    response) its records are a third split, "cold_start", which the cold start trains on
    (COLD_START_SPLIT); the "train" split is then GRPO's alone and may hold bare labels."""
    labels = list(c.data.labels)
    synthetic = c.data.source == "synthetic"
    counter = {} if synthetic else {"train": {}, "test": {}}  # generated records cannot be bad
    counts = {"train": c.data.synthetic_train, "test": c.data.synthetic_test}
    splits = {}
    # real data: a test image identical to a train image stops the build (the check runs where
    # the records are read, on the main process alone, on bytes already in memory)
    overlap = None if synthetic or c.data.allow_train_test_overlap else ImageOverlap()
    for s in ("train", "test"):
        records = sources.read_split(
            c.data.source,
            c.data[s],
            c.data[f"annotations_{s}"],
            s,
            labels,
            count=counts[s],
            seed=c.seed,
            image_size=c.data.image_size,
            image_sides=tuple(c.data.image_sides),
            # imperfect distilled answers: the synthetic generator's train split only
            unfaithful_share=c.data.unfaithful_share if s == "train" and synthetic else 0.0,
            synthetic_detail=c.data.synthetic_detail,
        )
        if not synthetic:
            records = sources.checked(records, c.data.skip_bad, c.data.max_bad_fraction, counter[s])
        if overlap is not None:
            records = overlap.watch(s, records)
        if is_set_answer is not None and c.cold_start.steps and s == "train" and not c.data.cold_start:
            records = sources.require_set_answers(records, is_set_answer, "answer")
        splits[s] = records
    if c.data.cold_start:
        splits["cold_start"] = _cold_start_records(c, labels, is_set_answer, counter.setdefault("cold_start", {}))
    if prompt_length is not None:
        for s, records in list(splits.items()):
            splits[s] = sources.drop_overlong(records, prompt_length, c.rl.max_prompt_len, dropped.setdefault(s, []))
    out = paths.join(c.workdir, "data")
    if paths.is_uri(out) and scratch is None:
        raise ValueError(f"{out}: a data store at a URI is read through a local copy; pass `scratch`")
    local = scratch.path("data") if paths.is_uri(out) else out
    stored = tfds_builder.dataset_path(out, NAME)
    if multihost.is_main():  # the workdir is shared: one process writes, all read their blocks
        built_before = local != out and epath.Path(stored, "dataset_info.json").exists()
        if built_before:  # tfds_builder.build compares its fingerprints with the records given
            paths.copy_tree(stored, tfds_builder.dataset_path(local, NAME))
        tfds_builder.build(splits, local, NAME)
        if local != out and not built_before:
            paths.copy_tree(tfds_builder.dataset_path(local, NAME), stored)
    multihost.barrier("data built")
    if not multihost.is_main() and local != out:
        paths.copy_tree(stored, tfds_builder.dataset_path(local, NAME))
    return local, counter


def _cold_start_records(c: ConfigDict, labels: list, is_set_answer, counter: dict):
    """data.cold_start's records, bad ones counted in `counter` (or stopping the build), each
    answer checked to be a SET answer when `is_set_answer` is given."""
    records = sources.checked(
        sources.read_cold_start(c.data.cold_start, labels), c.data.skip_bad, c.data.max_bad_fraction, counter
    )
    if is_set_answer is not None:
        records = sources.require_set_answers(records, is_set_answer, "response")
    return records


def train_size(directory: str) -> int:
    return len(pipeline.open_split(directory, NAME, "train"))


def train_iterator(directory: str, what: str, batch_size: int, seed: int, state=None, split: str = "train"):
    """This process's block of each global batch of `batch_size` shuffled records of `split`,
    repeating forever (`multihost.gather_records` gathers the blocks); `state` resumes it. Its
    saved state is the batch index, the same on every process."""
    if batch_size % jax.process_count():
        raise ValueError(f"{what}: a global batch of {batch_size} does not split over {jax.process_count()} processes")
    it = pipeline.make_iterator(
        directory,
        NAME,
        split,
        batch_size=batch_size // jax.process_count(),
        seed=seed,
        shuffle=True,
        num_epochs=None,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    if state is not None:
        it.set_state(state)
    return it


def test_records(directory: str, count: int) -> list[dict]:
    """The first `count` held-out records: each process reads its block; all hold the whole
    list, in the order one process reads it."""
    test = pipeline.open_split(directory, NAME, "test")
    count, procs, me = min(len(test), count), jax.process_count(), jax.process_index()
    return multihost.gather_records([test[i] for i in range(me * count // procs, (me + 1) * count // procs)])
