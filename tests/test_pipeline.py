"""The decode-once pipeline gives the batches the usual PIL + torchvision pipeline gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from tlopt.data.cache import decode_source
from tlopt.data.source import open_source
from tlopt.train.data import ImageSet


def test_batches_equal_the_pil_pipeline_within_rounding(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(6):
            h, w = rng.integers(40, 90, size=2)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                tmp_path / "data" / c / f"{i}.png"
                if (tmp_path / "data" / c).mkdir(parents=True, exist_ok=True) is None
                else None
            )
    source = open_source("folder", tmp_path / "data", val_fraction=0.2, test_fraction=0.0)
    size, mean, std = 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    decoded = decode_source(source, size, tmp_path / "cache")
    ours = ImageSet.from_arrays(np.asarray(decoded), np.zeros(len(decoded)), mean, std)
    usual = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    index = torch.arange(len(decoded))
    flip = torch.tensor([i % 2 == 1 for i in range(len(decoded))])
    got = ours.batch(index, flip)
    for i, item in enumerate(source.items):
        expected = usual(source.load(item))
        if flip[i]:
            expected = expected.flip(-1)
        # Both resize with PIL's bilinear filter; the cache stores uint8, ToTensor the same
        # uint8 values, so the only difference allowed is one grey level after normalising.
        torch.testing.assert_close(got[i], expected, atol=1.01 / 255 / min(std), rtol=0)
