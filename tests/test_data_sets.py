"""Built-in sets (digits, CIFAR-10 batches) and the decoded-image cache."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tlopt.data.cache as cache_module
from tlopt.data import (
    check_source,
    decode_source,
    labels,
    load_rgb,
    open_source,
    resize_square,
    split_indices,
)
from tlopt.errors import DataError

CIFAR_CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]


# --- digits -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return open_source("digits", val_fraction=0.2, test_fraction=0.2, seed=0)


def test_digits_are_the_real_set(digits):
    assert len(digits.items) == 1797
    assert digits.classes == tuple(str(d) for d in range(10))
    image = digits.load(digits.items[0])
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.asarray(image).max() <= 255 and digits.sizes[0] == (8, 8)
    assert digits.root is None and digits.skipped == ()


def test_digits_split_is_stratified(digits):
    counts = digits.counts()
    assert sum(counts["val"].values()) == 359 and sum(counts["test"].values()) == 359
    for name in digits.classes:
        total = sum(counts[split][name] for split in ("train", "val", "test"))
        assert counts["val"][name] == round(total * 0.2) == counts["test"][name]
    assert {item.key for item in digits.split_items("val")}.isdisjoint(
        item.key for item in digits.split_items("train")
    )


def test_digits_fingerprint_is_stable_and_follows_the_split(digits):
    assert open_source("digits", seed=0).fingerprint == digits.fingerprint
    assert open_source("digits", seed=1).fingerprint != digits.fingerprint
    assert open_source("digits", test_fraction=0.0).fingerprint != digits.fingerprint


def test_digits_report():
    report = check_source("digits")
    assert report.sizes is not None and report.sizes.max_width == 8
    assert sum(report.counts["train"].values()) == 1079


# --- CIFAR-10 ---------------------------------------------------------------------------------


def write_cifar(folder: Path, per_batch: int = 20) -> Path:
    """A CIFAR-10 batches folder in the real format, with five classes and tiny batches."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [i % len(CIFAR_CLASSES) for i in range(per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": CIFAR_CLASSES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


def test_cifar10_batches_load(tmp_path):
    root = write_cifar(tmp_path / "cifar-10-batches-py")
    source = open_source("cifar10", tmp_path, val_fraction=0.2)  # finds the extracted folder
    assert source.classes == tuple(c.decode() for c in CIFAR_CLASSES)
    counts = source.counts()
    assert counts["train"] == dict.fromkeys(source.classes, 16)
    assert counts["val"] == dict.fromkeys(source.classes, 4)
    assert counts["test"] == dict.fromkeys(source.classes, 4)
    assert all(item.key.startswith("cifar10/test_batch/") for item in source.split_items("test"))
    # Rows are channel planes: pixel (row 0, column 1) is at bytes 1, 1025 and 2049.
    with (root / "data_batch_2").open("rb") as handle:
        raw = pickle.load(handle)[b"data"][7]  # the test's own file: plain pickle is fine here
    item = next(i for i in source.items if i.key == "cifar10/data_batch_2/0007")
    assert np.asarray(source.load(item))[0, 1].tolist() == [raw[1], raw[1025], raw[2049]]
    assert open_source("cifar10", root, val_fraction=0.2).fingerprint == source.fingerprint


def test_cifar10_missing_file_is_named(tmp_path):
    root = write_cifar(tmp_path / "c")
    (root / "data_batch_4").unlink()
    with pytest.raises(DataError, match="has no 'data_batch_4'") as caught:
        open_source("cifar10", root)
    assert "\n" not in str(caught.value)


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_malicious_pickle_is_refused(tmp_path):
    root = write_cifar(tmp_path / "c")
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Exploit(marker)]}
    (root / "data_batch_1").write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match="refusing to load a pickle that refers to") as caught:
        open_source("cifar10", root)
    assert "system" in str(caught.value) and not marker.exists()


def test_cifar10_damaged_pickle(tmp_path):
    root = write_cifar(tmp_path / "c")
    (root / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="cannot read CIFAR-10 file"):
        open_source("cifar10", root)


# --- cache ------------------------------------------------------------------------------------


def small_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate(("a", "b")):
        for i in range(5):
            pixels = rng.integers(0, 256, (20 + i, 30 + 3 * k, 3), dtype=np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_cache_is_built_once_and_memory_mapped(tmp_path, monkeypatch):
    source = open_source("folder", small_folder(tmp_path / "data"))
    cache_dir = tmp_path / "cache"
    first = decode_source(source, 16, cache_dir)
    assert first.shape == (10, 16, 16, 3) and first.dtype == np.uint8
    for index, item in enumerate(source.items):
        expected = resize_square(load_rgb(source.root / item.key), 16)
        assert np.array_equal(first[index], expected)
    files = [p.name for p in cache_dir.iterdir()]
    assert files == [
        f"decoded-v{cache_module.FORMAT}-{source.fingerprint[:16]}-16.npy"
    ]  # no temporary file left

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second call must not decode")

    monkeypatch.setattr(cache_module, "resize_square", no_decoding)
    second = decode_source(source, 16, cache_dir)
    assert isinstance(second, np.memmap) and np.array_equal(first, second)


def test_cache_rebuilds_a_damaged_file(tmp_path):
    source = open_source("folder", small_folder(tmp_path / "data"))
    path = cache_module.cache_path(source, 8, tmp_path)
    np.save(path, np.zeros((3, 8, 8, 3), np.uint8))  # wrong shape: e.g. another version
    assert decode_source(source, 8, tmp_path).shape == (10, 8, 8, 3)


def test_labels_and_split_indices(tmp_path):
    source = open_source("folder", small_folder(tmp_path / "data"), test_fraction=0.0)
    assert labels(source).dtype == np.int64
    assert labels(source).tolist() == [item.label for item in source.items]
    indices = split_indices(source)
    assert set(indices) == {"train", "val"}
    assert sorted(np.concatenate(list(indices.values())).tolist()) == list(range(10))
    assert all(source.items[i].split == "val" for i in indices["val"])


def test_cache_of_digits(tmp_path, digits):
    pixels = decode_source(digits, 8, tmp_path, progress=True)
    assert np.array_equal(pixels[5], np.asarray(digits.load(digits.items[5])))
