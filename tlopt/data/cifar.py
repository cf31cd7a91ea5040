"""CIFAR-10's python batches, loaded by an unpickler that builds numpy arrays only."""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tlopt.data.records import Contents, Record, array_records
from tlopt.data.split import assign_splits
from tlopt.errors import DataError

_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_FILES = (*_TRAIN_BATCHES, "test_batch", "batches.meta")


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


def read_cifar10(
    path: Path, val_fraction: float, seed: int, held_out: Mapping[str, str] | None = None
) -> Contents:
    """CIFAR-10 python batches: data_batch_1..5 split into train and val, test_batch as test.

    ``path`` is the folder of the batches, or the folder the official archive was extracted in.
    """
    if not path.is_dir():
        raise DataError(
            f"CIFAR-10 folder '{path}' does not exist: pass the folder with data_batch_1..5"
        )
    if not (path / "batches.meta").exists() and (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"  # the folder the official archive extracts to
    for name in _FILES:  # name the first missing file before reading 180 MB
        if not (path / name).is_file():
            _load_batch(path / name)
    meta = _load_batch(path / "batches.meta")
    names = meta.get(b"label_names")
    if not isinstance(names, list) or len(names) < 2:
        raise DataError(f"'{path / 'batches.meta'}' has no b'label_names' list: it is corrupt")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    arrays: dict[str, np.ndarray] = {}
    records: list[Record] = []
    by_class: dict[str, list[str]] = defaultdict(list)
    pending: list[tuple[list[str], list[int], np.ndarray]] = []
    for batch in (*_TRAIN_BATCHES, "test_batch"):
        pixels, labels = _batch_arrays(path / batch, len(classes))
        group = f"cifar10/{batch}"
        arrays[group] = pixels
        keys = [f"{group}/{i:04d}" for i in range(len(labels))]
        if batch == "test_batch":
            records += array_records(keys, labels, pixels, dict.fromkeys(keys, "test"))
            continue
        pending.append((keys, labels, pixels))
        for key, label in zip(keys, labels, strict=True):
            by_class[classes[label]].append(key)
    # Carve val from the five training batches pooled, stratified: test_batch is the test split.
    split_of = assign_splits(by_class, val_fraction, 0.0, seed, held_out)
    for keys, labels, pixels in pending:
        records += array_records(keys, labels, pixels, split_of)
    return Contents(path, classes, records, arrays=arrays)
