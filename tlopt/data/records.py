"""What a reader of one source kind hands to :func:`~tlopt.data.source.open_source`.

The readers (:mod:`~tlopt.data.folder`, :mod:`~tlopt.data.digits`, :mod:`~tlopt.data.cifar`)
find the classes and a :class:`Record` per usable image, split already assigned; ``open_source``
orders them, fingerprints them and builds the :class:`~tlopt.data.source.Source`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Record:
    """One usable image, with its final split and the sha256 (hex) of its content."""

    key: str
    label: int
    split: str
    digest: str
    size: tuple[int, int]
    mode: str = "RGB"


@dataclass(frozen=True)
class Contents:
    """What a reader of one source kind found.

    Attributes:
        root: the folder read (``None`` for built-in sets).
        classes: class names, sorted; a record's label indexes this list.
        records: every usable image, in any order.
        skipped: ``(key, reason)`` for every image file that could not be decoded.
        ignored: files that are not images (by suffix) or are hidden.
        arrays: for built-in sets, the RGB pixels by key prefix (``"digits"``).
    """

    root: Path | None
    classes: Sequence[str]
    records: Sequence[Record]
    skipped: Sequence[tuple[str, str]] = ()
    ignored: int = 0
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)


def array_records(
    keys: Sequence[str], labels: Sequence[int], pixels: np.ndarray, split_of: Mapping[str, str]
) -> list[Record]:
    """Records of images held in an ``(N, H, W, 3)`` array; the digest hashes the pixels."""
    size = (int(pixels.shape[2]), int(pixels.shape[1]))
    return [
        Record(key, label, split_of[key], hashlib.sha256(pixels[i].tobytes()).hexdigest(), size)
        for i, (key, label) in enumerate(zip(keys, labels, strict=True))
    ]
