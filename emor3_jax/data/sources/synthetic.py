"""The synthetic emotion set, generated in code (--config.data.source=synthetic; see
emor3_jax/data/synthetic.py for what it draws)."""

from collections.abc import Iterator, Sequence

from emor3_jax.data.synthetic import SyntheticEmotions, to_record

SPLITS = ("train", "test")


def read_synthetic(
    split: str,
    labels: Sequence[str],
    *,
    count: int,
    seed: int,
    image_size: int,
    image_sides: Sequence[int],
    unfaithful_share: float,
    detail: str = "size",
) -> Iterator[dict]:
    """`count` generated records of `split` (train | test) for `seed`, images `image_size`
    pixels a side (with `image_sides` = (min, max): web-photo sizes, see synthetic.image_shape),
    encoded as PNG, their truth as JSON; a share `unfaithful_share` of the answers carries a
    wrong detail (synthetic.make_example); step 1 names `detail` (synthetic.DETAILS) beside the
    figure. The split is checked now, the generator's other
    arguments when the first record is drawn, each record's label (one of `labels`) as it is."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
    return _records(split, labels, count, seed, image_size, image_sides, unfaithful_share, detail)


def _records(
    split: str,
    labels: Sequence[str],
    count: int,
    seed: int,
    image_size: int,
    image_sides: Sequence[int],
    unfaithful_share: float,
    detail: str,
) -> Iterator[dict]:
    for ex in SyntheticEmotions(
        count,
        seed,
        size=image_size,
        split=split,
        unfaithful_share=unfaithful_share,
        sides=tuple(image_sides) or None,
        detail=detail,
    ):
        if ex["label"] not in labels:
            raise ValueError(f"synthetic record {ex['id']}: label {ex['label']!r} is not one of {list(labels)}")
        yield to_record(ex)
