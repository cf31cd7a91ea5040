"""One hyperparameter, one meaning on every path a trial can take through the trainer.

A head trial trains through the batched head trainer (K at once on cached features), ``fit``
on cached features (a cut backbone, a head that is not a plain linear layer), ``fit`` on
images (random-resized crops, a feature cache too small) or the whole model (a backbone
whose top level is not a plain sequence of blocks). Which one depends on the study, not on
what the trial means: with the same seed and data each path gives the same history, dropout
included (issue 21: on the images path the head's dropout ran twice). One test per path, so
the next difference is caught where it is born.

Tolerance: 1e-4 relative (1e-6 absolute) on each epoch's losses: the paths sum in another
order (``baddbmm`` against ``nn.Linear``, the prefix per batch against once); accuracy within
one image of the 100.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.test_trainer import digits  # noqa: F401  (the module-scoped fixture)
from tlopt.models.backbones import create_backbone
from tlopt.models.split import SplitModel
from tlopt.models.stages import apply_stage, parse_stage
from tlopt.train.data import ImageSet
from tlopt.train.feature_cache import FeatureCache
from tlopt.train.heads import HeadTask, fit_heads
from tlopt.train.inputs import cached_prefix
from tlopt.train.ledger import EpochRecord, FitResult, TrainParams
from tlopt.train.trainer import fit

Data = tuple[ImageSet, ImageSet]
DROPOUT = 0.5  # high, so that a second dropout (p -> 1 - (1 - p)^2) shows at once
PARAMS = TrainParams(batch_size=16, epochs=3, lr=3e-2, optimizer="adam", flip=True)
SEED = 3


class Wrapped(nn.Module):
    """A timm model inside a user's module: its top level is one module, not a sequence of
    blocks, so the trainer runs the whole model every step (SplitModel mode "none")."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.drop_rate = net.drop_rate
        self.pretrained_cfg = {**net.pretrained_cfg, "classifier": "net.classifier"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)  # type: ignore[no-any-return]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(x, pre_logits=pre_logits)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def tlopt_block_groups(self) -> list[list[str]]:
        return [["net.conv_stem", "net.bn1"], ["net.blocks"], ["net.conv_head", "net.bn2"]]


def _head_model(wrapped: bool = False, cut: int | None = None) -> nn.Module:
    torch.manual_seed(0)  # every path starts from the same random head
    model = create_backbone("test_efficientnet", "none", 10, DROPOUT, cut)
    model = Wrapped(model) if wrapped else model
    apply_stage(model, parse_stage("head"))
    return model


def _fit(model: nn.Module, data: Data, params: TrainParams = PARAMS, **kw: Any) -> FitResult:
    return fit(model, data[0], data[1], params, seed=SEED, **kw)


def _batched(model: nn.Module, data: Data, params: TrainParams = PARAMS) -> FitResult:
    """The batched head trainer on the model's cached pooled features, among two others."""
    split = SplitModel(model.eval(), int(data[0].images.shape[1]))
    assert split.mode == "pooled"
    train = cached_prefix(split, data[0], True, FeatureCache())
    val = cached_prefix(split, data[1], False, FeatureCache())
    assert train is not None and val is not None
    head = split.classifier
    mates = [TrainParams(batch_size=8, epochs=2, lr=1e-2, optimizer="sgd"), params]
    tasks = [HeadTask(p, DROPOUT) for p in [*mates, params]]
    labels = (data[0].labels, data[1].labels)
    results = fit_heads(
        tasks, head.weight, head.bias, train, labels[0], val[0], labels[1], seed=SEED
    )
    assert isinstance(results[1], FitResult)
    return results[1]


def _same(a: list[EpochRecord], b: list[EpochRecord]) -> None:
    assert [r.epoch for r in a] == [r.epoch for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss"):
            assert getattr(x, key) == pytest.approx(getattr(y, key), rel=1e-4, abs=1e-6), (x, y)
        for key in ("train_accuracy", "val_accuracy"):
            assert getattr(x, key) == pytest.approx(getattr(y, key), abs=0.0101), (x, y)
        assert x.lr == pytest.approx(y.lr, rel=1e-9)


def test_the_batched_head_trainer_equals_fit_on_cached_features(digits: Data) -> None:  # noqa: F811
    plain = _fit(_head_model(), digits)
    assert SplitModel(_head_model(), 32).mode == "pooled"
    _same(_batched(_head_model(), digits).history, plain.history)


def test_fit_on_images_equals_fit_on_cached_features(digits: Data) -> None:  # noqa: F811
    """A feature cache too small runs the frozen prefix every step, in train mode."""
    cached = _fit(_head_model(), digits)
    images = _fit(_head_model(), digits, cache=FeatureCache(max_bytes=0))
    _same(images.history, cached.history)


def test_the_whole_model_path_equals_the_batched_one(digits: Data) -> None:  # noqa: F811
    model = _head_model(wrapped=True)
    assert SplitModel(model, 32).mode == "none"
    whole = _fit(model, digits)
    _same(whole.history, _batched(_head_model(), digits).history)


def test_crops_on_images_equal_crops_on_the_whole_model(digits: Data) -> None:  # noqa: F811
    """Random-resized crops run the prefix every step (on images); the whole-model path
    draws the same crops and masks."""
    params = TrainParams(**{**PARAMS.__dict__, "crop_scale": 0.6})
    on_images = _fit(_head_model(), digits, params)
    whole = _fit(_head_model(wrapped=True), digits, params)
    _same(on_images.history, whole.history)


def test_a_cut_backbone_on_cached_features_equals_the_batched_trainer(digits: Data) -> None:  # noqa: F811
    """A head trial on a cut backbone trains through fit on its cached pooled features."""
    cut = _fit(_head_model(cut=1), digits)
    _same(cut.history, _batched(_head_model(cut=1), digits).history)
