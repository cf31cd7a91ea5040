"""Descriptors: the pooled vector before the classifier, one row per image.

The export writes them for every image; the size probe fits its linear probe on them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tlopt.models.fold import folded_features, folded_like
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
    if n == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    batch_size = batch_size or inference_batch(images.images.device)
    device = images.images.device
    pooled = folded_like(
        lambda x: model.forward_head(model.forward_features(x), pre_logits=True),
        lambda: folded_features(model),  # a third faster on the CPU (tlopt.models.fold)
        images.batch(torch.arange(min(n, 2), device=device)),
    )
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n), device=device)
        features = pooled(images.batch(index))
        feats.append(features.float())
        logits.append(model.get_classifier()(features).float())
    return torch.cat(feats).cpu().numpy(), torch.cat(logits).cpu().numpy()
