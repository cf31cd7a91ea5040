"""Benchmark: a frozen backbone's pooled features as timm builds it against the same backbone
with its BatchNorms folded into the convolutions (tlopt.models.fold), in one run.

    python scripts/bench_fold.py                           # EfficientNet-Lite0, 288 px, 32 images
    python scripts/bench_fold.py --backbone resnet50 --weights none --image-size 224 --json

The images are crops of scikit-learn's two sample photos. Both ways run the same batch,
alternately, ``--repeats`` times after a warm-up each; the figures are medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_sample_images

from tlopt.devices import pick_device
from tlopt.errors import TloptError
from tlopt.models.backbones import create_backbone, normalization
from tlopt.models.fold import agrees, fold_batchnorm
from tlopt.train.data import ImageSet


def photos(count: int, size: int, device: torch.device) -> torch.Tensor:
    """``count`` square crops of the sample photos (seeded), resized to ``size`` px, NHWC uint8."""
    rng = np.random.default_rng(0)
    sources = [
        torch.from_numpy(img.copy()).permute(2, 0, 1).float() for img in load_sample_images().images
    ]
    crops = []
    for i in range(count):
        img = sources[i % len(sources)]
        side = int(rng.integers(200, min(img.shape[1:]) + 1))
        top = int(rng.integers(0, img.shape[1] - side + 1))
        left = int(rng.integers(0, img.shape[2] - side + 1))
        crop = img[None, :, top : top + side, left : left + side]
        crops.append(torch.nn.functional.interpolate(crop, size=(size, size), mode="area")[0])
    return torch.stack(crops).permute(0, 2, 3, 1).round().to(torch.uint8).to(device)


def measure(args: argparse.Namespace) -> dict[str, object]:
    device = pick_device(args.device)
    model = create_backbone(args.backbone, args.weights, 2).eval().to(device)
    mean, std = normalization(model)
    data = ImageSet(photos(args.batch, args.image_size, device), torch.zeros(args.batch), mean, std)
    x = data.batch(torch.arange(args.batch, device=device))
    folded, folds = fold_batchnorm(model)

    def run(m: Any) -> tuple[float, torch.Tensor]:  # a timm model
        began = time.perf_counter()
        out = m.forward_head(m.forward_features(x), pre_logits=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began, out

    times: dict[str, list[float]] = {"timm": [], "folded": []}
    with torch.no_grad():
        expected, got = run(model)[1], run(folded)[1]  # warm-up, and the comparison
        for _ in range(args.repeats):
            times["timm"].append(run(model)[0])
            times["folded"].append(run(folded)[0])
    plain, fast = float(np.median(times["timm"])), float(np.median(times["folded"]))
    return {
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": args.image_size,
        "batch": args.batch,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "batchnorms_folded": folds,
        "timm_s": round(plain, 4),
        "folded_s": round(fast, 4),
        "ratio": round(fast / plain, 3),
        "max_abs_difference": float((got - expected).abs().max()),
        "agrees": agrees(got, expected),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="bundled", help="pretrained, bundled or none")
    parser.add_argument("--image-size", type=int, default=288)
    parser.add_argument("--batch", type=int, default=32, help="images per pass (32: the CPU's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch", "repeats"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            print(f"error: {flag} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        result = measure(args)
    except TloptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['backbone']} at {args.image_size} px, {args.batch} images on {result['device']} "
        f"({result['threads']} threads): timm {result['timm_s']:.3f} s, folded "
        f"{result['folded_s']:.3f} s ({result['ratio']:.2f} of it); "
        f"{result['batchnorms_folded']} BatchNorms folded, features agree: {result['agrees']} "
        f"(max difference {result['max_abs_difference']:.1e})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
