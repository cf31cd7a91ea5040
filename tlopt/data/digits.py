"""scikit-learn's 1,797 real 8x8 handwritten digits, as a built-in source."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np

from tlopt.data.records import Contents, array_records
from tlopt.data.split import assign_splits


def read_digits(
    val_fraction: float,
    test_fraction: float,
    seed: int,
    held_out: Mapping[str, str] | None = None,
) -> Contents:
    """The digits as grey-on-RGB uint8 images, split stratified and seeded."""
    from sklearn.datasets import load_digits  # heavy import, needed only here

    digits = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); 255/16 maps 16 to white.
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    pixels = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    labels = [int(t) for t in digits.target]
    keys = [f"digits/{i:04d}" for i in range(len(labels))]
    classes = [str(c) for c in range(10)]
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, label in zip(keys, labels, strict=True):
        by_class[classes[label]].append(key)
    split_of = assign_splits(by_class, val_fraction, test_fraction, seed, held_out)
    records = array_records(keys, labels, pixels, split_of)
    return Contents(None, classes, records, arrays={"digits": pixels})
