"""``tlopt predict``: the class of every image in a file or folder, with an exported model."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tlopt.errors import TloptError
from tlopt.export.bundle import load_model, model_folder, read_config
from tlopt.export.inference import Preprocess, image_files, run_files


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise probabilities (float64) from logits."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def export_classes(model_dir: Path) -> list[str]:
    """The class names of an export, in the order of the classifier's outputs."""
    names = read_config(model_folder(model_dir))["label_names"]
    if isinstance(names, dict):  # timm allows {index: name}
        names = [names[k] for k in sorted(names, key=int)]
    return [str(n) for n in names]


def predict_images(
    model_dir: Path,
    images: Path,
    out: Path,
    device: str | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Write ``out``: one CSV row per readable image (path, class, ``p_<class>`` per class).

    Args:
        model_dir: a folder written by ``tlopt export-best`` (or its ``model/`` folder).
        images: an image file, or a folder searched recursively (hidden entries left out).
        out: the CSV file to write; paths in it are relative to ``images`` when a folder.
        device: ``auto`` (None: the GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: images per forward pass.

    Returns:
        A summary: ``count``, ``skipped``, ``skipped_files``, ``out``, ``class_counts``,
        ``device``, ``model``.

    Raises:
        TloptError: not an export, no images, no readable image, a bad device or batch size.
    """
    if out.is_dir():
        raise TloptError(f"--out '{out}' is a folder: pass a file name such as predictions.csv")
    classes = export_classes(model_dir)
    model = load_model(model_dir)
    prep = Preprocess.of(model, model_dir)
    result = run_files(model, prep, image_files(images), device, batch_size)
    if result.logits.shape[1] != len(classes):
        raise TloptError(
            f"the model in '{model_dir}' has {result.logits.shape[1]} outputs but its config "
            f"names {len(classes)} classes: export it again with 'tlopt export-best'"
        )
    probabilities = softmax(result.logits)
    predicted = probabilities.argmax(axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        # "p_" keeps a class named "path" or "class" from shadowing those columns.
        writer.writerow(["path", "class", *(f"p_{name}" for name in classes)])
        for name, label, row in zip(result.names, predicted, probabilities, strict=True):
            writer.writerow([name, classes[label], *(f"{p:.9g}" for p in row)])
    counts = Counter(classes[i] for i in predicted)
    return {
        "count": len(result.names),
        "skipped": len(result.skipped),
        "skipped_files": [{"path": p, "reason": r} for p, r in result.skipped],
        "out": str(out),
        "class_counts": {name: counts.get(name, 0) for name in classes},
        "device": result.device,
        "model": str(model_dir),
    }
