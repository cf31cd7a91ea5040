"""Data sources: an image folder, scikit-learn's digits, or CIFAR-10's python batches.

:func:`open_source` reads the whole source once: every image file is hashed and decoded (that
is how corrupt files are found), unreadable ones are skipped with a reason, the split is fixed
(from the folder layout, or stratified and seeded), and a content fingerprint names the result.
A :class:`Source` is small (keys, labels, splits); pixels are decoded later, once, by
:func:`tlopt.data.cache.decode_source`.

Problems that make the source unusable raise :class:`~tlopt.errors.DataError` (one line, says
what to do). Problems worth knowing but not fatal (skipped files, the same picture in two
splits) are reported with :func:`warnings.warn` as :class:`DataWarning`, so a caller can turn
them into errors or collect them with ``warnings.catch_warnings(record=True)``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tlopt.data.cifar import read_cifar10
from tlopt.data.digits import read_digits
from tlopt.data.folder import read_folder
from tlopt.data.images import decode_rgb, read_bytes
from tlopt.data.records import Contents, Record
from tlopt.errors import DataError
from tlopt.names import DATA_SOURCES

SPLITS = ("train", "val", "test")
_SPLIT_ORDER = {name: rank for rank, name in enumerate(SPLITS)}


class DataWarning(UserWarning):
    """A data problem that does not stop training: skipped files, duplicates across splits."""


@dataclass(frozen=True)
class Item:
    """One labelled image of a source.

    Attributes:
        key: where the image lives: the POSIX path relative to the folder root
            (``"train/roses/001.jpg"``), or ``"digits/0123"``, ``"cifar10/data_batch_1/0042"``.
        label: the index of its class in :attr:`Source.classes`.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """

    key: str
    label: int
    split: str


@dataclass(frozen=True)
class Source:
    """A read, verified and split data source. Build one with :func:`open_source`.

    Attributes:
        kind: ``"folder"``, ``"digits"`` or ``"cifar10"``.
        root: the folder read (``None`` for built-in sets).
        classes: class names, sorted; an item's label indexes this tuple.
        items: every usable image, ordered by split (train, val, test), class, then key.
        skipped: ``(key, reason)`` for every image file that could not be decoded.
        converted: ``(mode, count)`` for images stored in a mode other than RGB.
        fingerprint: sha256 (hex) of the keys, labels, splits, class names and image bytes.
        sizes: ``(width, height)`` of each item as decoded, aligned with :attr:`items`.
        duplicates: how many distinct pictures (same bytes) appear in more than one split.
        ignored: files that are not images (by suffix) or are hidden, left out silently.
        arrays: for built-in sets, the RGB pixels by key prefix (``"digits"``).
    """

    kind: str
    root: Path | None
    classes: tuple[str, ...]
    items: tuple[Item, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    converted: tuple[tuple[str, int], ...] = ()
    fingerprint: str = ""
    sizes: tuple[tuple[int, int], ...] = ()
    duplicates: int = 0
    ignored: int = 0
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def load(self, item: Item) -> Image.Image:
        """Decode one item as an RGB image.

        Raises:
            BadImage: a folder file changed since the source was opened and no longer decodes.
        """
        if self.kind == "folder":
            assert self.root is not None, "a folder source always has a root"
            # Not load_rgb: its warning filter is not thread-safe, and caches call this from
            # threads. decode_rgb refuses oversized images on its own.
            path = self.root / item.key
            return decode_rgb(read_bytes(path), str(path))[0]
        group, _, index = item.key.rpartition("/")
        return Image.fromarray(self.arrays[group][int(index)])

    def split_items(self, split: str) -> list[Item]:
        """The items of one split, in source order (empty if the split does not exist)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} but got {split!r}")
        return [item for item in self.items if item.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, for the splits present; every class appears in each."""
        tally = Counter((item.split, item.label) for item in self.items)
        present = [split for split in SPLITS if any(s == split for s, _ in tally)]
        return {
            split: {name: tally[split, label] for label, name in enumerate(self.classes)}
            for split in present
        }


def open_source(
    kind: str,
    path: str | Path | None = None,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_bad_fraction: float = 0.1,
    held_out: Mapping[str, str] | None = None,
    verified: Path | None = None,
) -> Source:
    """Read, verify and split a data source.

    Args:
        kind: ``"folder"``, ``"digits"`` or ``"cifar10"``.
        path: the image folder, or the folder holding CIFAR-10's python batches; unused for
            ``"digits"``.
        val_fraction: share of each class carved out for validation, where the source does not
            bring its own validation split.
        test_fraction: share of each class carved out for testing, for a folder of class
            folders and for digits (0 means no test split). A folder with ``train/`` keeps
            only its own ``test/``; CIFAR-10 uses its ``test_batch``.
        seed: seeds the stratified split; the same seed gives the same split.
        max_bad_fraction: the share of unreadable image files above which the folder is
            refused rather than used with those files skipped.
        held_out: the val and test keys of the split tlopt carves, as a study stored them
            (:func:`held_out_keys`); given, they replace the seeded draw.
        verified: a folder where a folder source keeps the digests of the files it decoded
            without error, to hash and not decode them the next time (workers pass theirs).

    Returns:
        The verified :class:`Source`.

    Raises:
        DataError: the source is missing, empty, has fewer than two classes, a class without a
            readable image, mismatched splits, too many unreadable files, or a bad setting.

    Example:
        >>> source = open_source("digits", seed=0)
        >>> len(source.items), source.classes[:3]
        (1797, ('0', '1', '2'))
    """
    _check_fractions(val_fraction, test_fraction, max_bad_fraction)
    if kind == "digits":
        return _assemble("digits", read_digits(val_fraction, test_fraction, seed, held_out))
    if kind not in DATA_SOURCES:
        raise DataError(f"unknown data kind {kind!r}: use one of {', '.join(DATA_SOURCES)}")
    if path is None:
        raise DataError(f"data kind {kind!r} needs a path: set data.path in the study file")
    try:
        folder = Path(path).expanduser()
    except RuntimeError:  # '~someone/...' for a user this machine does not know
        raise DataError(f"data path '{path}': cannot expand '~' (no such user)") from None
    if "\x00" in str(folder):
        raise DataError(f"data path {str(path)!r} contains a NUL character")
    if kind == "cifar10":
        return _assemble(kind, read_cifar10(folder, val_fraction, seed, held_out))
    contents = read_folder(
        folder, val_fraction, test_fraction, seed, max_bad_fraction, held_out, verified
    )
    return _assemble(kind, contents)


def held_out_keys(source: Source) -> dict[str, str]:
    """The split of every val and test item (the rest train), for a study to store."""
    return {item.key: item.split for item in source.items if item.split != "train"}


def _check_fractions(val_fraction: float, test_fraction: float, max_bad_fraction: float) -> None:
    # val must be non-empty: every study minimises the validation loss.
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive) but got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1) but got {test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 (some images must train) but got "
            f"{val_fraction} + {test_fraction}"
        )
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise DataError(f"max_bad_fraction must be in [0, 1] but got {max_bad_fraction}")


def _assemble(kind: str, contents: Contents) -> Source:
    """Order the records, fingerprint them, count modes and cross-split duplicates, and warn."""
    ordered = sorted(contents.records, key=lambda r: (_SPLIT_ORDER[r.split], r.label, r.key))
    modes = Counter(r.mode for r in ordered if r.mode != "RGB")
    source = Source(
        kind=kind,
        root=contents.root,
        classes=tuple(contents.classes),
        items=tuple(Item(r.key, r.label, r.split) for r in ordered),
        skipped=tuple(sorted(contents.skipped)),
        converted=tuple(sorted(modes.items())),
        fingerprint=_fingerprint(kind, contents.classes, ordered),
        sizes=tuple(r.size for r in ordered),
        duplicates=_count_duplicates(ordered),
        ignored=contents.ignored,
        arrays=dict(contents.arrays),
    )
    _warn(source)
    return source


def _fingerprint(kind: str, classes: Sequence[str], records: Iterable[Record]) -> str:
    """sha256 over the class names and the sorted (key, label, split, content hash) rows.

    The root path is left out on purpose: a moved or copied folder keeps its caches.
    """
    digest = hashlib.sha256(json.dumps([kind, list(classes)]).encode())
    for row in sorted((r.key, r.label, r.split, r.digest) for r in records):
        digest.update(json.dumps(row).encode() + b"\n")
    return digest.hexdigest()


def _count_duplicates(records: Iterable[Record]) -> int:
    splits_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        splits_of[record.digest].add(record.split)
    return sum(1 for splits in splits_of.values() if len(splits) > 1)


def _warn(source: Source) -> None:
    """Warn of skipped files and of pictures in more than one split."""
    where = source.kind if source.root is None else f"'{source.root}'"
    if source.skipped:
        warnings.warn(
            f"skipped {len(source.skipped)} unreadable image file(s) in {where}: run "
            f"'tlopt data check {source.root}' to list them",
            DataWarning,
            stacklevel=4,  # the caller of open_source
        )
    if source.duplicates:
        warnings.warn(
            f"{source.duplicates} image(s) in {where} appear in more than one split (same "
            "bytes): validation and test scores will look better than they are",
            DataWarning,
            stacklevel=4,  # the caller of open_source
        )
