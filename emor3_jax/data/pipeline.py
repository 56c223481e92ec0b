"""Grain input pipeline over the ArrayRecord data sets written by `tfds_builder.build`.

  it = make_iterator(data_dir, "emoset2k", "train", batch_size=8, seed=0, shuffle=True,
                     num_epochs=None, shard_index=jax.process_index(),
                     shard_count=jax.process_count())
  batch = next(it)          # list of batch_size records
  state = it.get_state()    # small dict; save it with the checkpoint
  it2 = make_iterator(...same arguments...); it2.set_state(state)   # continues exactly

Each element of a batch is a RECORD with python types:
  {"id": str, "image": bytes, "label": str, "problem": str, "answer": str, "truth": str}

Order of operations (all index arithmetic on a grain MapDataset, no buffers):
  source -> shuffle(seed) -> repeat(num_epochs) -> [truncate] -> batch(batch_size)
  -> [shard_index::shard_count]
`shuffle` draws a new permutation each epoch (grain seeds epoch e with seed + e).
Every process must use the same seed: they all compute the same global order,
cut it into global batches of batch_size * shard_count records, and process i
reads only block i (records i*batch_size .. (i+1)*batch_size - 1) of each. So
the processes' batches, concatenated in process order, are exactly the batch one
process would read with batch_size * shard_count: a run's data does not depend
on how many hosts it runs on. Only the records of a process's own block are read.
With `drop_remainder` and finite `num_epochs`, the global stream is cut to a
multiple of batch_size * shard_count, so every process yields the same number
of full batches (the records cut are the tail of the last epoch's order). With
`num_epochs=None` the stream is endless and every process always has full
batches. With `drop_remainder=False` the last batches may be short and
processes may differ by one batch (meant for evaluation on one process, or
callers that gather).

Resumption: the iterator's state is the index of the next batch in this
deterministic index map, so `set_state` on a fresh iterator built with the
same arguments resumes with exactly the batches the old one would have given.
"""

import os

import grain
import tensorflow_datasets as tfds

from emor3_jax.data.tfds_builder import dataset_path

_TEXT_KEYS = ("id", "label", "problem", "answer", "truth")


def _to_python(example: dict) -> dict:
    """tfds gives bytes for Text features; make them str and keep the image bytes."""
    record = {k: example[k].decode("utf-8") for k in _TEXT_KEYS}
    record["image"] = bytes(example["image"])
    return record


def open_split(data_dir, name: str, split: str) -> grain.MapDataset:
    """The split (any tfds split string, e.g. "train" or "train[:10%]") as a MapDataset of records."""
    path = dataset_path(data_dir, name)
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        raise FileNotFoundError(
            f"no data set {name!r} under {data_dir} (expected {path}; write it with tfds_builder.build)"
        )
    builder = tfds.builder_from_directory(path)
    missing = [k for k in _TEXT_KEYS if k not in builder.info.features]
    if missing:
        raise ValueError(
            f"{path} lacks features {missing} (written by an older builder); rebuild it with overwrite=True"
        )
    names = [part.split("[")[0].strip() for part in split.split("+")]
    if any(n not in builder.info.splits for n in names):
        raise ValueError(f"{path} has splits {sorted(builder.info.splits)}, not {split!r}")
    source = builder.as_data_source(split=split)
    return grain.MapDataset.source(source).map(_to_python)


def make_iterator(
    data_dir,
    name: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
    drop_remainder: bool = True,
    read_threads: int = 4,
) -> grain.DatasetIterator:
    """Iterator of batches (lists of `batch_size` records) of this process's shard.

    See the module docstring for ordering, sharding, truncation and resumption.
    `read_threads` threads read ahead (0 reads in the caller's thread).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, shard_count={shard_count}"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (endless) or >= 1, got {num_epochs}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")

    ds = open_split(data_dir, name, split)
    epoch_len = len(ds)
    if epoch_len == 0:
        raise ValueError(f"split {split!r} of {name!r} is empty")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None and drop_remainder:
        global_batch = batch_size * shard_count
        keep = len(ds) // global_batch * global_batch
        if keep == 0:
            raise ValueError(
                f"{num_epochs} epoch(s) of {epoch_len} records give no full global batch of "
                f"{batch_size} x {shard_count} shards; lower batch_size or set drop_remainder=False"
            )
        ds = ds[:keep]
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)[shard_index::shard_count]
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * read_threads, 1))
    return iter(ds.to_iter_dataset(read_options))
