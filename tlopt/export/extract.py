"""``tlopt extract``: descriptors of any image file or folder with an exported model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from tlopt.export.bundle import load_model
from tlopt.export.inference import Preprocess, image_files, run_files


def extract_folder(
    model_dir: Path,
    images: Path,
    out: Path,
    device: str | None = None,
    batch_size: int = 128,
) -> tuple[int, int]:
    """Write ``out`` (N, D) float32 and ``out.csv`` (row, path); returns (written, skipped).

    Images are prepared as the model trained on them (see :mod:`tlopt.export.inference`), so
    a training image's row equals its row in the export's ``descriptors.npy``.
    """
    model = load_model(model_dir)
    prep = Preprocess.of(model, model_dir)
    result = run_files(model, prep, image_files(images), device, batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, result.descriptors.astype(np.float32))
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path"])
        writer.writerows(enumerate(result.names))
    return len(result.names), len(result.skipped)
