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
import os
import pickle
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlopt.data.images import bomb_guard, decode_rgb, is_image_file, read_bytes
from tlopt.errors import BadImage, DataError
from tlopt.names import DATA_SOURCES

KINDS = DATA_SOURCES  # the data kinds a study file names
SPLITS = ("train", "val", "test")
_VAL_DIR_NAMES = ("val", "valid", "validation")
_SPLIT_ORDER = {name: rank for rank, name in enumerate(SPLITS)}
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")


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


@dataclass(frozen=True)
class _Record:
    """One usable image before the source is assembled."""

    key: str
    label: int
    split: str
    digest: str
    size: tuple[int, int]
    mode: str = "RGB"


def open_source(
    kind: str,
    path: str | Path | None = None,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_bad_fraction: float = 0.1,
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
        return _open_digits(val_fraction, test_fraction, seed)
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}: use one of {', '.join(KINDS)}")
    if path is None:
        raise DataError(f"data kind {kind!r} needs a path: set data.path in the study file")
    try:
        folder = Path(path).expanduser()
    except RuntimeError:  # '~someone/...' for a user this machine does not know
        raise DataError(f"data path '{path}': cannot expand '~' (no such user)") from None
    if "\x00" in str(folder):
        raise DataError(f"data path {str(path)!r} contains a NUL character")
    if kind == "cifar10":
        return _open_cifar10(folder, val_fraction, seed)
    return _open_folder(folder, val_fraction, test_fraction, seed, max_bad_fraction)


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


# --- splitting --------------------------------------------------------------------------------


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


def _assign_splits(
    keys_by_class: Mapping[str, Sequence[str]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Stratified, seeded split: each class is shuffled on its own and cut by the fractions.

    Each class's generator is seeded from ``seed`` and the class name, so adding a class or an
    image to one class leaves the other classes' splits as they were.
    """
    split_of: dict[str, str] = {}
    for name, keys in keys_by_class.items():
        ordered = sorted(keys)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8", "surrogateescape"))])
        shuffled = [ordered[i] for i in rng.permutation(len(ordered))]
        n_val, n_test = _split_sizes(len(ordered), val_fraction, test_fraction)
        for rank, key in enumerate(shuffled):
            split_of[key] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split_of


# --- assembling a source ----------------------------------------------------------------------


def _assemble(
    kind: str,
    root: Path | None,
    classes: Sequence[str],
    records: Iterable[_Record],
    *,
    skipped: Sequence[tuple[str, str]] = (),
    ignored: int = 0,
    arrays: Mapping[str, np.ndarray] | None = None,
) -> Source:
    """Order the records, fingerprint them and count modes and cross-split duplicates."""
    ordered = sorted(records, key=lambda r: (_SPLIT_ORDER[r.split], r.label, r.key))
    modes = Counter(r.mode for r in ordered if r.mode != "RGB")
    return Source(
        kind=kind,
        root=root,
        classes=tuple(classes),
        items=tuple(Item(r.key, r.label, r.split) for r in ordered),
        skipped=tuple(sorted(skipped)),
        converted=tuple(sorted(modes.items())),
        fingerprint=_fingerprint(kind, classes, ordered),
        sizes=tuple(r.size for r in ordered),
        duplicates=_count_duplicates(ordered),
        ignored=ignored,
        arrays=dict(arrays or {}),
    )


def _fingerprint(kind: str, classes: Sequence[str], records: Iterable[_Record]) -> str:
    """sha256 over the class names and the sorted (key, label, split, content hash) rows.

    The root path is left out on purpose: a moved or copied folder keeps its caches.
    """
    digest = hashlib.sha256(json.dumps([kind, list(classes)]).encode())
    for row in sorted((r.key, r.label, r.split, r.digest) for r in records):
        digest.update(json.dumps(row).encode() + b"\n")
    return digest.hexdigest()


def _count_duplicates(records: Iterable[_Record]) -> int:
    splits_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        splits_of[record.digest].add(record.split)
    return sum(1 for splits in splits_of.values() if len(splits) > 1)


def _warn_duplicates(source: Source, where: str) -> None:
    if source.duplicates:
        warnings.warn(
            f"{source.duplicates} image(s) in {where} appear in more than one split (same "
            "bytes): validation and test scores will look better than they are",
            DataWarning,
            stacklevel=4,  # the caller of open_source
        )


# --- built-in sets ----------------------------------------------------------------------------


def _open_digits(val_fraction: float, test_fraction: float, seed: int) -> Source:
    """scikit-learn's 1,797 real 8x8 handwritten digits, as grey-on-RGB uint8 images."""
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
    split_of = _assign_splits(by_class, val_fraction, test_fraction, seed)
    records = _array_records(keys, labels, pixels, split_of)
    source = _assemble("digits", None, classes, records, arrays={"digits": pixels})
    _warn_duplicates(source, "digits")
    return source


def _array_records(
    keys: Sequence[str], labels: Sequence[int], pixels: np.ndarray, split_of: Mapping[str, str]
) -> list[_Record]:
    size = (int(pixels.shape[2]), int(pixels.shape[1]))
    return [
        _Record(key, label, split_of[key], hashlib.sha256(pixels[i].tobytes()).hexdigest(), size)
        for i, (key, label) in enumerate(zip(keys, labels, strict=True))
    ]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 batches that can build numpy arrays and nothing else.

    A pickle can call any importable function while it loads (``os.system`` included); a
    downloaded batch is untrusted, so only the names a real batch refers to are allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        # Python 3 pickles of protocol < 3 spell bytes as _codecs.encode(text, "latin1").
        ("_codecs", "encode"): ("codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise DataError(
                f"refusing to load a pickle that refers to {module}.{name}: a CIFAR-10 batch "
                "holds only numpy arrays; download the batches again from the CIFAR-10 site"
            )
        return getattr(_numpy_module(target[0]), target[1])


def _numpy_module(name: str) -> Any:
    """numpy's own module for ``name``; numpy 2 moved ``numpy.core`` to ``numpy._core``."""
    import codecs

    if name == "numpy":
        return np
    if name == "codecs":
        return codecs
    try:
        core = __import__(f"numpy._core.{name}", fromlist=[name])
    except ImportError:  # numpy 1.x
        core = __import__(f"numpy.core.{name}", fromlist=[name])
    return core


def _load_batch(path: Path) -> dict[Any, Any]:
    """Load one CIFAR-10 pickle through :class:`_BatchUnpickler`; string keys become bytes."""
    if not path.is_file():
        raise DataError(
            f"CIFAR-10 folder '{path.parent}' has no '{path.name}': extract "
            "cifar-10-python.tar.gz there (it holds data_batch_1..5, test_batch, batches.meta)"
        )
    try:
        with path.open("rb") as handle:
            # encoding="bytes": the official batches are Python 2 pickles of byte strings.
            loaded = _BatchUnpickler(handle, encoding="bytes").load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot read CIFAR-10 file '{path}' ({type(exc).__name__}: {exc}): download the "
            "python version of the batches again"
        ) from None
    if not isinstance(loaded, dict):
        raise DataError(f"'{path}' is not a CIFAR-10 batch (expected a dict of arrays)")
    return {k.encode() if isinstance(k, str) else k: v for k, v in loaded.items()}


def _batch_arrays(path: Path, n_classes: int) -> tuple[np.ndarray, list[int]]:
    """(N, 32, 32, 3) uint8 pixels and labels of one batch, checked against the format."""
    batch = _load_batch(path)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"'{path}' is not a CIFAR-10 batch: b'data' must be an (N, 3072) array")
    if labels is None or len(labels) != len(data):
        raise DataError(f"'{path}' is not a CIFAR-10 batch: b'labels' must have one per image")
    label_list = [int(v) for v in labels]
    if any(not 0 <= v < n_classes for v in label_list):
        raise DataError(f"'{path}' has labels outside 0..{n_classes - 1}: the batch is corrupt")
    # Rows are stored channel-major (1024 red, 1024 green, 1024 blue), each plane row by row.
    pixels = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(pixels), label_list


def _open_cifar10(path: Path, val_fraction: float, seed: int) -> Source:
    """CIFAR-10 python batches: data_batch_1..5 split into train and val, test_batch as test."""
    if not path.is_dir():
        raise DataError(
            f"CIFAR-10 folder '{path}' does not exist: pass the folder with data_batch_1..5"
        )
    if not (path / "batches.meta").exists() and (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"  # the folder the official archive extracts to
    for name in _CIFAR_FILES:  # name the first missing file before reading 180 MB
        if not (path / name).is_file():
            _load_batch(path / name)
    meta = _load_batch(path / "batches.meta")
    names = meta.get(b"label_names")
    if not isinstance(names, list) or len(names) < 2:
        raise DataError(f"'{path / 'batches.meta'}' has no b'label_names' list: it is corrupt")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    arrays: dict[str, np.ndarray] = {}
    records: list[_Record] = []
    by_class: dict[str, list[str]] = defaultdict(list)
    pending: list[tuple[list[str], list[int], np.ndarray]] = []
    for batch in (*_CIFAR_TRAIN, "test_batch"):
        pixels, labels = _batch_arrays(path / batch, len(classes))
        group = f"cifar10/{batch}"
        arrays[group] = pixels
        keys = [f"{group}/{i:04d}" for i in range(len(labels))]
        if batch == "test_batch":
            records += _array_records(keys, labels, pixels, dict.fromkeys(keys, "test"))
            continue
        pending.append((keys, labels, pixels))
        for key, label in zip(keys, labels, strict=True):
            by_class[classes[label]].append(key)
    # Carve val from the five training batches pooled, stratified: test_batch is the test split.
    split_of = _assign_splits(by_class, val_fraction, 0.0, seed)
    for keys, labels, pixels in pending:
        records += _array_records(keys, labels, pixels, split_of)
    source = _assemble("cifar10", path, classes, records, arrays=arrays)
    _warn_duplicates(source, f"'{path}'")
    return source


# --- image folders ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """An image file found in a class folder, before it is read."""

    path: Path
    key: str
    class_name: str
    split: str | None  # None: tlopt assigns the split


@dataclass(frozen=True)
class _Read:
    """What reading a good file tells: its content hash, decoded size and stored mode."""

    digest: str
    size: tuple[int, int]
    mode: str


@dataclass
class _Layout:
    """The image files of a folder, the class folders of each split, and the files ignored."""

    found: list[_Found] = field(default_factory=list)
    classes: dict[str | None, list[str]] = field(default_factory=dict)
    ignored: int = 0


def _open_folder(
    root: Path, val_fraction: float, test_fraction: float, seed: int, max_bad_fraction: float
) -> Source:
    """An image folder: ``root/<class>/...`` or ``root/train/<class>/...`` plus val (and test)."""
    if not root.exists():
        raise DataError(
            f"data folder '{root}' does not exist: check data.path in the study file or pass an "
            "existing folder"
        )
    if not root.is_dir():
        raise DataError(f"data path '{root}' is a file, not a folder: pass the folder of classes")
    layout = _find_images(root)
    reads = _read_all([f.path for f in layout.found])
    good = [(f, r) for f, r in zip(layout.found, reads, strict=True) if isinstance(r, _Read)]
    bad = [(f, r) for f, r in zip(layout.found, reads, strict=True) if isinstance(r, BadImage)]
    classes = _check_classes(root, layout, good, bad)
    _check_bad_fraction(root, len(bad), len(layout.found), max_bad_fraction)
    records = _folder_records(good, classes, val_fraction, test_fraction, seed)
    skipped = [(f.key, r.reason) for f, r in bad]
    source = _assemble("folder", root, classes, records, skipped=skipped, ignored=layout.ignored)
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} unreadable image file(s) in '{root}': run "
            f"'tlopt data check {root}' to list them",
            DataWarning,
            stacklevel=3,  # the caller of open_source
        )
    _warn_duplicates(source, f"'{root}'")
    return source


def _find_images(root: Path) -> _Layout:
    """Image files by class and split, read from the folder layout."""
    names = {p.name for p in _visible_dirs(root)}
    val_dirs = [name for name in _VAL_DIR_NAMES if name in names]
    if len(val_dirs) > 1:
        both = " and ".join(repr(v) for v in val_dirs)
        raise DataError(f"data folder '{root}' has both {both}: keep one validation folder")
    if "train" not in names and (val_dirs or "test" in names):
        present = val_dirs[0] if val_dirs else "test"
        raise DataError(
            f"data folder '{root}' has '{present}' but no 'train' folder: add "
            f"'{root / 'train'}/<class>/' or put the class folders directly in '{root}'"
        )
    if "train" not in names:
        layout = _Layout()
        _scan_split(layout, root, root, None)
        _require_two_classes(root, layout.classes[None])
        return layout
    plan = [("train", "train"), *((v, "val") for v in val_dirs)]
    plan += [("test", "test")] if "test" in names else []
    layout = _Layout(ignored=_count_loose_files(root))
    for folder, split in plan:
        _scan_split(layout, root, root / folder, split)
    _require_two_classes(root / "train", layout.classes["train"])
    return layout


def _scan_split(layout: _Layout, root: Path, folder: Path, split: str | None) -> None:
    """Add the image files under ``folder/<class>/`` (any depth) to ``layout``."""
    class_dirs = _visible_dirs(folder)
    layout.classes[split] = [p.name for p in class_dirs]
    layout.ignored += _count_loose_files(folder)
    for class_dir in class_dirs:
        for path in _walk_files(class_dir):
            if _is_hidden(path.name) or not is_image_file(path):
                layout.ignored += 1
                continue
            key = path.relative_to(root).as_posix()
            layout.found.append(_Found(path, key, class_dir.name, split))


def _require_two_classes(folder: Path, classes: Sequence[str]) -> None:
    if not classes:
        loose = sum(1 for p in folder.iterdir() if p.is_file() and is_image_file(p))
        hint = f" (found {loose} image file(s) directly in it)" if loose else ""
        raise DataError(
            f"no class folders in '{folder}'{hint}: put each class's images in its own "
            f"sub-folder, like '{folder / '<class>' / 'image.jpg'}'"
        )
    if len(classes) == 1:
        raise DataError(
            f"found only one class '{classes[0]}' in '{folder}': an image classifier needs at "
            "least two class folders"
        )


def _is_hidden(name: str) -> bool:
    """Hidden entries and macOS archive debris are never classes or images."""
    return name.startswith(".") or name == "__MACOSX"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _count_loose_files(folder: Path) -> int:
    """Files lying next to the class (or split) folders: in no class, so ignored."""
    return sum(1 for p in folder.iterdir() if not p.is_dir())


def _walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, skipping hidden folders.

    Symlinked folders are not entered (``followlinks=False``), which rules out symlink loops;
    symlinked files are listed and followed when read.
    """
    files: list[Path] = []
    for current, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        files += (Path(current) / name for name in sorted(filenames))
    return files


def _read_one(path: Path) -> _Read | BadImage:
    """Read a file once: hash its bytes and decode those same bytes."""
    try:
        data = read_bytes(path)
        img, mode = decode_rgb(data, str(path))
    except BadImage as exc:
        return exc
    return _Read(hashlib.sha256(data).hexdigest(), img.size, mode)


def _read_all(paths: Sequence[Path]) -> list[_Read | BadImage]:
    """Read and verify files on a thread pool (Pillow's decoders and hashlib release the GIL)."""
    with bomb_guard(), ThreadPoolExecutor() as pool:
        return list(pool.map(_read_one, paths))


def _check_classes(
    root: Path,
    layout: _Layout,
    good: Sequence[tuple[_Found, _Read]],
    bad: Sequence[tuple[_Found, BadImage]],
) -> list[str]:
    """The sorted class list, after checking the splits agree and every class has an image."""
    reference = layout.classes["train"] if "train" in layout.classes else layout.classes[None]
    for other in ("val", "test"):
        if other in layout.classes and set(layout.classes[other]) != set(reference):
            raise DataError(_mismatch_message(root, other, reference, layout.classes[other]))
    readable = {(f.split, f.class_name) for f, _ in good}
    for split, names in layout.classes.items():
        for name in names:
            if (split, name) not in readable:
                raise DataError(_empty_class_message(root, split, name, bad))
    return sorted(reference)


def _mismatch_message(root: Path, split: str, train: Sequence[str], other: Sequence[str]) -> str:
    only_train = ", ".join(repr(c) for c in sorted(set(train) - set(other))) or "none"
    only_other = ", ".join(repr(c) for c in sorted(set(other) - set(train))) or "none"
    return (
        f"train and {split} folders in '{root}' have different classes (only in train: "
        f"{only_train}; only in {split}: {only_other}): give both the same class folders"
    )


def _empty_class_message(
    root: Path, split: str | None, name: str, bad: Sequence[tuple[_Found, BadImage]]
) -> str:
    unreadable = [
        f"{f.key}: {r.reason}" for f, r in bad if (f.split, f.class_name) == (split, name)
    ]
    why = f" ({len(unreadable)} unreadable, e.g. {unreadable[0]})" if unreadable else ""
    where = f"'{root}'" if split is None else f"the {split} split of '{root}'"
    return (
        f"class '{name}' in {where} has no readable image{why}: add images to it or remove "
        "the folder"
    )


def _check_bad_fraction(root: Path, n_bad: int, n_total: int, limit: float) -> None:
    if n_total and n_bad / n_total > limit:
        raise DataError(
            f"{n_bad} of {n_total} image files in '{root}' are unreadable "
            f"({n_bad / n_total:.0%}, above max_bad_fraction {limit:g}): run 'tlopt data check "
            f"{root}' to list them, then fix or remove them (or raise data.max_bad_fraction)"
        )


def _folder_records(
    good: Sequence[tuple[_Found, _Read]],
    classes: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[_Record]:
    """Records with their final split: from the layout, or carved per class by tlopt.

    A folder of class folders is split into train, val and test. A ``train/`` folder without a
    validation folder only has val carved out of it; its own ``test/`` (if any) is the test.
    """
    label_of = {name: label for label, name in enumerate(classes)}
    pre_split = any(f.split is not None for f, _ in good)
    has_val = any(f.split == "val" for f, _ in good)
    carve: dict[str, list[str]] = defaultdict(list)
    for f, _ in good:
        if f.split is None or (f.split == "train" and not has_val):
            carve[f.class_name].append(f.key)
    split_of = _assign_splits(carve, val_fraction, 0.0 if pre_split else test_fraction, seed)
    return [
        _Record(
            f.key,
            label_of[f.class_name],
            split_of.get(f.key, f.split or "train"),
            r.digest,
            r.size,
            r.mode,
        )
        for f, r in good
    ]
