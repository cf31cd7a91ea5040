"""Decode a source once into a square uint8 array on disk, shared by every worker.

Training never decodes JPEGs per epoch (that caps training at a few hundred images per second,
see DESIGN.md "Performance facts"): the whole source is resized, cropped and stored once as a
``.npy`` file named by the source's fingerprint and the image size. Workers memory-map it, so
several processes on one machine share one copy in the page cache.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tlopt.data.images import bomb_guard, resize_square
from tlopt.data.source import SPLITS, Item, Source
from tlopt.progress import bar

# Images decoded per round of the thread pool: bounds the memory held by finished-but-unwritten
# results (1,024 images of 224 px are 154 MB) while keeping every thread busy.
_CHUNK = 1024


# Bumped whenever decoding changes (resize arithmetic, colour conversion): old files are not
# reused. 2: resize and crop match torchvision's Resize + CenterCrop.
FORMAT = 2


def cache_path(source: Source, image_size: int, cache_dir: Path) -> Path:
    """Where :func:`decode_source` keeps the decoded array of ``source`` at ``image_size``."""
    return Path(cache_dir) / f"decoded-v{FORMAT}-{source.fingerprint[:16]}-{image_size}.npy"


def decode_source(
    source: Source, image_size: int, cache_dir: Path, progress: bool = False
) -> np.ndarray:
    """All images of ``source``, resized and centre-cropped, from the cache (built if missing).

    Args:
        source: the verified source; its fingerprint names the cache file.
        image_size: side of the square images, in pixels.
        cache_dir: folder of cache files (created if missing).
        progress: show a tqdm progress bar while decoding.

    Returns:
        A read-only memory-mapped ``uint8`` array of shape
        ``(len(source.items), image_size, image_size, 3)``, in the order of ``source.items``.

    Raises:
        BadImage: a folder file changed since the source was opened and no longer decodes.

    Example:
        >>> pixels = decode_source(open_source("digits"), 32, Path(".tlopt-cache"))
        >>> pixels.shape, pixels.dtype
        ((1797, 32, 32, 3), dtype('uint8'))
    """
    if image_size < 1:
        raise ValueError(f"image_size must be at least 1 but got {image_size}")
    path = cache_path(source, image_size, cache_dir)
    shape = (len(source.items), image_size, image_size, 3)
    cached = _load_cached(path, shape)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    _build(source, image_size, path, shape, progress)
    return np.load(path, mmap_mode="r")


def _load_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array, or ``None`` if it is missing or not what this source needs."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r")
    # A half-copied or foreign file is rebuilt rather than trusted.
    except (OSError, ValueError):
        return None
    if array.shape != shape or array.dtype != np.uint8:
        return None
    return array


def _build(
    source: Source, image_size: int, path: Path, shape: tuple[int, ...], progress: bool
) -> None:
    """Decode into a temporary file beside ``path``, then rename it into place.

    ``os.replace`` is atomic within a folder, so a worker sees either no cache or a whole one;
    two workers building at once each write their own temporary file and the last rename wins
    with identical content.
    """
    with _temporary_beside(path) as tmp:
        if shape[0] == 0:  # numpy cannot memory-map an empty file
            np.save(tmp, np.zeros(shape, dtype=np.uint8))
        else:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            with bar(
                total=shape[0],
                desc="decoding images",
                unit="img",
                disable=None if progress else True,
            ) as shown:
                for start, pixels in _decode_chunks(source, image_size):
                    out[start : start + len(pixels)] = pixels
                    shown.update(len(pixels))
            out.flush()
            del out  # close the map before the rename (required on Windows)
        os.replace(tmp, path)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A fresh file name in ``path``'s folder, removed if the block fails before renaming it."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npy")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _decode_chunks(source: Source, image_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start index, decoded images) in item order, decoded on a thread pool."""

    def decode(item: Item) -> np.ndarray:
        return resize_square(source.load(item), image_size)

    items = source.items
    with bomb_guard(), ThreadPoolExecutor() as pool:
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            yield start, np.stack(list(pool.map(decode, chunk)))


def labels(source: Source) -> np.ndarray:
    """The label of each item, as ``int64``, in the order of ``source.items``."""
    return np.fromiter(
        (item.label for item in source.items), dtype=np.int64, count=len(source.items)
    )


def split_indices(source: Source) -> dict[str, np.ndarray]:
    """Positions in ``source.items`` (and so in the decoded array) of each split present.

    Example:
        >>> split_indices(open_source("digits"))["val"][:3]  # doctest: +SKIP
        array([312, 313, 314])
    """
    names = np.array([item.split for item in source.items])
    return {
        split: np.flatnonzero(names == split).astype(np.int64)
        for split in SPLITS
        if np.any(names == split)
    }
