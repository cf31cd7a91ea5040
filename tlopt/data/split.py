"""The stratified, seeded split of a source's images into train, val and test."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for a class of ``n`` images: rounded shares, train keeps at least one.

    A requested split gets at least one image when the class has room, so a small class still
    shows up in validation; train is served first, then val, then test.
    """
    n_val = max(round(n * val_fraction), 1 if val_fraction > 0 else 0)
    n_test = max(round(n * test_fraction), 1 if test_fraction > 0 else 0)
    while n - n_val - n_test < 1 and n_val + n_test > 0:
        if n_test > 0 and n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def assign_splits(
    keys_by_class: Mapping[str, Sequence[str]],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    held_out: Mapping[str, str] | None = None,
    content_of: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Stratified, seeded split: each class is shuffled on its own and cut by the fractions.

    Each class's generator is seeded from ``seed`` and the class name, so adding a class or an
    image to one class leaves the other classes' splits as they were.

    Args:
        held_out: the split of every val and test key as a study stored it when it was created
            (every other key trains). Given, it is the split: NumPy does not promise to keep
            its random streams, so workers on another NumPy still agree with the study.
        content_of: a content hash per key. Keys of one content (byte-identical files) go
            to one split, so that no picture is both trained on and validated: each class
            shuffles its pictures rather than its files and fills test, then val, by file
            counts. A picture also in a class split before (classes go in name order) joins
            the split it got there. Without twins the split is the one without
            ``content_of``.

    Returns:
        The split (``"train"``, ``"val"`` or ``"test"``) of every key.
    """
    if held_out is not None:
        return {key: held_out.get(key, "train") for keys in keys_by_class.values() for key in keys}
    split_of: dict[str, str] = {}
    split_of_content: dict[str, str] = {}
    for name in sorted(keys_by_class) if content_of is not None else keys_by_class:
        ordered = sorted(keys_by_class[name])
        groups: dict[str, list[str]] = {}  # content -> its keys, in key order
        for key in ordered:
            groups.setdefault(content_of[key] if content_of is not None else key, []).append(key)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8", "surrogateescape"))])
        contents = list(groups)
        shuffled = [contents[i] for i in rng.permutation(len(contents))]
        n_val, n_test = _split_sizes(len(ordered), val_fraction, test_fraction)
        filled = {"test": 0, "val": 0, "train": 0}
        placed = [c for c in shuffled if c in split_of_content]
        for content in placed + [c for c in shuffled if c not in split_of_content]:
            split = split_of_content.get(content)
            held = filled["test"] + filled["val"] + len(groups[content])
            if split is None and held < len(ordered):  # train keeps at least one file
                split = (
                    "test" if filled["test"] < n_test else "val" if filled["val"] < n_val else None
                )
            split = split or "train"
            filled[split] += len(groups[content])
            split_of_content[content] = split
            for key in groups[content]:
                split_of[key] = split
    return split_of
