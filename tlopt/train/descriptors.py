"""Descriptors: the pooled vector before the classifier, one row per image.

The export writes them for every image; the size probe fits its linear probe on them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tlopt.train.data import ImageSet
from tlopt.train.inputs import inference_batch


@torch.no_grad()
def predict(
    model: nn.Module, images: ImageSet, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors (N, D) float32 and logits (N, K) of every image, in eval mode.

    The batches' outputs stay on the device and are copied to the host once, at the end (a
    copy per batch would make the host wait for the device at every batch).
    """
    model.eval()
    feats, logits = [], []
    n = len(images)
    batch_size = batch_size or inference_batch(images.images.device)
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n), device=images.images.device)
        x = images.batch(index)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        feats.append(features.float())
        logits.append(model.get_classifier()(features).float())
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(feats).cpu().numpy(), torch.cat(logits).cpu().numpy()
