"""``tlopt extract``: descriptors of any image folder with an exported model."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import timm
import torch

from tlopt.data.images import is_image_file, load_rgb, resize_square
from tlopt.errors import BadImage, DataError
from tlopt.export.bundle import load_model
from tlopt.export.descriptors import predict
from tlopt.train.data import ImageSet


def extract_folder(model_dir: Path, images: Path, out: Path) -> tuple[int, int]:
    """Write ``out`` (N, D) float32 and ``out.csv`` (row, path); returns (written, skipped)."""
    if not images.is_dir():
        raise DataError(f"image folder '{images}' does not exist: pass --images FOLDER")
    model = load_model(model_dir)
    cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    paths = sorted(
        p
        for p in images.rglob("*")
        if p.is_file()
        and is_image_file(p)
        and not any(part.startswith(".") for part in p.relative_to(images).parts)
    )
    arrays, kept, skipped = [], [], 0
    for path in paths:
        try:
            arrays.append(resize_square(load_rgb(path), size))
            kept.append(path)
        except BadImage as bad:
            warnings.warn(f"skipped {bad}", stacklevel=1)
            skipped += 1
    if not kept:
        raise DataError(f"no readable image in '{images}': put .jpg/.png files there")
    data = ImageSet.from_arrays(
        np.stack(arrays),
        np.zeros(len(kept), np.int64),
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        "cuda" if torch.cuda.is_available() else "cpu",
    )
    model.to(data.images.device)
    descriptors, _ = predict(model, data)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, descriptors)
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path"])
        writer.writerows((i, str(p.relative_to(images))) for i, p in enumerate(kept))
    return len(kept), skipped
