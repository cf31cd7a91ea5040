"""Which image size to train at: a linear probe on the frozen backbone's features, per size.

    python scripts/size_probe.py --config studies/hymenoptera.toml --sizes 224,256,288,320

For each size the study file's images are decoded at that size (tlopt's own resize and centre
crop, through its decoded-image cache), the backbone with the file's weights maps each training
image and its mirror image to pooled features, and a logistic regression (scikit-learn, one fit
per C) is scored on the validation split. The head stage is such a probe, so a size that gives a
lower probe loss gives a better head, and the fine-tuning stages start from it. Bigger images
cost about (size / 224) ** 2 as much per epoch. Prints one row per size: seconds, then each C's
validation log loss and correct images. ``tlopt tune --image-size auto`` runs the same probe
(tlopt.tune.size_probe), the lowest loss over C per size, and chooses the size.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from tlopt.config import load_config
from tlopt.data.cache import decode_source, labels, split_indices
from tlopt.errors import TloptError
from tlopt.models.backbones import create_backbone, normalization
from tlopt.train.data import ImageSet
from tlopt.train.descriptors import predict
from tlopt.tune.context import cache_dir, open_config_source
from tlopt.tune.size_probe import C_VALUES, probe_fit


def descriptors(model: torch.nn.Module, pixels: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The export's descriptors (timm's pooled pre-logits) of uint8 NHWC ``pixels``."""
    mean, std = normalization(model)
    return predict(model, ImageSet.from_arrays(pixels, y, mean, std))[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a study file")
    parser.add_argument("--data", help="the data folder, instead of the file's data.path")
    parser.add_argument("--sizes", default="224,256,288,320", help="comma-separated sides")
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        if min(sizes) < 8:
            raise ValueError
    except ValueError:
        print(
            f"error: --sizes {args.sizes}: give sides of 8 px or more, e.g. 224,288",
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config(args.config, args.data)
        source = open_config_source(config)
    except TloptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    index, y = split_indices(source), labels(source)
    if "val" not in index:
        print("error: the study's data has no validation split", file=sys.stderr)
        return 2
    model = create_backbone(config.model.backbone, config.model.weights, len(source.classes))
    model.eval()
    print(
        f"{config.name}: {config.model.backbone} ({config.model.weights}); "
        f"{len(index['train'])} train, {len(index['val'])} val images; "
        + ", ".join(f"C={c:g}" for c in C_VALUES)
        + ": val log loss / correct"
    )
    for size in sizes:
        start = time.perf_counter()
        pixels = decode_source(source, size, cache_dir())
        tr, ytr = pixels[index["train"]], y[index["train"]]
        mirrored = tr[:, :, ::-1]  # NHWC: the width axis
        x = np.concatenate([descriptors(model, tr, ytr), descriptors(model, mirrored, ytr)])
        train = (x, np.concatenate([ytr, ytr]))
        val = (descriptors(model, pixels[index["val"]], y[index["val"]]), y[index["val"]])
        cells = [probe_fit(train, val, c) for c in C_VALUES]
        row = "  ".join(f"{loss:.4f} / {hits}" for loss, hits, _ in cells)
        print(f"{size:>5d} px  {time.perf_counter() - start:6.1f} s  {row}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
