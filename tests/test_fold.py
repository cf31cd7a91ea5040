"""BatchNorm folded into the convolution before it, for the frozen passes (tlopt.models.fold)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image
from torch import nn

from tlopt.models.backbones import create_backbone
from tlopt.models.fold import agrees, fold_batchnorm, folded_like
from tlopt.models.split import SplitModel
from tlopt.models.stages import apply_stage, parse_stage, set_train_mode
from tlopt.train.data import ImageSet
from tlopt.train.descriptors import predict


def _photos(size: int = 96) -> ImageSet:
    """Two real photos (scikit-learn's) and their mirror images, ``size`` px, as uint8 NHWC."""
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        img = torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1)[None].float()
        img = nn.functional.interpolate(img, size=(size, size), mode="area")[0]
        crops += [img, img.flip(-1)]
    pixels = torch.stack(crops).permute(0, 2, 3, 1).round().to(torch.uint8)
    return ImageSet(pixels, torch.tensor([0, 0, 1, 1]), (0.5,) * 3, (0.5,) * 3)


def test_folding_the_real_backbone_keeps_its_features_and_leaves_it_unchanged() -> None:
    model = create_backbone("tf_efficientnet_lite0", "bundled", 2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _photos().batch(torch.arange(4))
    folded, folds = fold_batchnorm(model)
    # 1 stem + 16 blocks (the first has 2 convolutions, the others 3) + the head's 1x1 conv
    assert folds == 1 + 2 + 15 * 3 + 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        expected, got = model.forward_features(x), folded.forward_features(x)
    assert agrees(got, expected) and not torch.equal(got, expected)  # rounded, not the same
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_the_export_pass_gives_the_unfolded_models_descriptors_and_logits() -> None:
    model = create_backbone("tf_efficientnet_lite0", "bundled", 2).eval()
    data = _photos()
    descriptors, logits = predict(model, data, batch_size=3)  # two batches, the last short
    with torch.no_grad():
        x = data.batch(torch.arange(4))
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        assert agrees(torch.from_numpy(descriptors), expected)
        assert agrees(torch.from_numpy(logits), model.get_classifier()(expected))
    # The mirror image of a photo is another input: its descriptor differs.
    assert not np.allclose(descriptors[0], descriptors[1], atol=1e-3)


@pytest.mark.parametrize("stage", ["head", "freeze1", "freeze2"])
def test_a_stages_folded_prefix_gives_its_prefix(stage: str) -> None:
    model = create_backbone("tf_efficientnet_lite0", "bundled", 2)
    apply_stage(model, parse_stage(stage))
    set_train_mode(model, True)  # as fit trains it: the frozen prefix stays in eval mode
    split = SplitModel(model, 96)
    assert split.mode == ("pooled" if stage == "head" else "body")
    data = _photos()
    fast = split.folded_prefix(data.batch(torch.arange(2)))
    assert fast != split.prefix  # the folded copy was kept
    with torch.no_grad():
        x = data.batch(torch.arange(2, 4))  # other images than the check's
        assert agrees(fast(x), split.prefix(x))


class _NormFirst(nn.Module):
    """Registers a convolution and then a BatchNorm, but normalises before convolving."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_a_fold_that_computes_something_else_is_dropped() -> None:
    model = _NormFirst().eval()
    folded, folds = fold_batchnorm(model)
    assert folds == 1  # the registration order says conv, bn
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert folded_like(model, lambda: folded, x) is model


def test_a_batchnorm_in_train_mode_is_not_replaced_by_its_running_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert folded_like(model, lambda: fold_batchnorm(model)[0], x) is model
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))[1] == 0
