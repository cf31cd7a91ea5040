"""Many head trials at once (tlopt.train.heads) against the one-trial trainer."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_trainer import digits  # noqa: F401  (the module-scoped fixture)
from tlopt.models.backbones import create_backbone
from tlopt.models.split import SplitModel
from tlopt.models.stages import apply_stage, parse_stage
from tlopt.train.data import ImageSet
from tlopt.train.feature_cache import FeatureCache
from tlopt.train.heads import HeadTask, fit_heads
from tlopt.train.inputs import cached_prefix
from tlopt.train.ledger import FitResult, NonFiniteLoss, TrainParams
from tlopt.train.trainer import fit


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_backbone("test_efficientnet", "none", num_classes=10)
    apply_stage(model, parse_stage("head"))
    return model


def _features(data: tuple[ImageSet, ImageSet]) -> tuple[torch.Tensor, ...]:
    model = _model().eval()  # as fit computes the prefix: BatchNorm on running statistics
    split = SplitModel(model, int(data[0].images.shape[1]))
    assert split.mode == "pooled"
    train = cached_prefix(split, data[0], True, FeatureCache())
    val = cached_prefix(split, data[1], False, FeatureCache())
    assert train is not None and val is not None
    head = split.classifier
    return train, val[0], head.weight, head.bias  # type: ignore[return-value]


def _single(data: tuple[ImageSet, ImageSet], params: TrainParams) -> FitResult:
    return fit(_model(), data[0], data[1], params, seed=3)


TASKS = [
    TrainParams(batch_size=16, epochs=3, lr=3e-3, optimizer="adam"),
    TrainParams(batch_size=8, epochs=4, lr=1e-2, decay="step", optimizer="adam",
                decay_params={"step_size": 2, "gamma": 0.5}),
    TrainParams(batch_size=32, epochs=2, lr=1e-3, optimizer="adam", weight_decay=1e-3,
                flip=False),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd", "rmsprop"])
def test_batched_heads_equal_one_trial_at_a_time(
    kind: str,
    digits: tuple[ImageSet, ImageSet],  # noqa: F811
) -> None:
    """Without dropout each batched trial's history equals fit's on the cached features."""
    train, val, weight, bias = _features(digits)
    tasks = [HeadTask(TrainParams(**{**p.__dict__, "optimizer": kind}), 0.0) for p in TASKS]
    batched = fit_heads(tasks, weight, bias, train, digits[0].labels, val, digits[1].labels, seed=3)
    for task, got in zip(tasks, batched, strict=True):
        assert isinstance(got, FitResult)
        want = _single(digits, task.params)
        assert len(got.history) == task.params.epochs
        for a, b in zip(got.history, want.history, strict=True):
            assert a.val_loss == pytest.approx(b.val_loss, rel=1e-4, abs=1e-5)
            assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4, abs=1e-5)
            assert a.val_accuracy == pytest.approx(b.val_accuracy, abs=1 / 100)
            assert a.lr == pytest.approx(b.lr, rel=1e-6)
        assert got.best_epoch == want.best_epoch
        head = want.best_state
        assert torch.allclose(got.best_state["weight"], head["fc.weight"] if "fc.weight" in head
                              else head["classifier.weight"], atol=1e-4)  # fmt: skip


def test_a_trial_does_not_depend_on_its_batch_mates(
    digits: tuple[ImageSet, ImageSet],  # noqa: F811
) -> None:
    """With dropout (drawn from each trial's own generator), alone or batched is the same."""
    train, val, weight, bias = _features(digits)
    tasks = [HeadTask(p, 0.3) for p in TASKS]
    together = fit_heads(tasks, weight, bias, train, digits[0].labels, val, digits[1].labels)
    alone = fit_heads(tasks[1:2], weight, bias, train, digits[0].labels, val, digits[1].labels)
    a, b = together[1], alone[0]
    assert isinstance(a, FitResult) and isinstance(b, FitResult)
    assert [r.val_loss for r in a.history] == pytest.approx([r.val_loss for r in b.history])


def test_pruning_or_nan_ends_one_trial_not_the_batch(
    digits: tuple[ImageSet, ImageSet],  # noqa: F811
) -> None:
    train, val, weight, bias = _features(digits)
    tasks = [
        HeadTask(TrainParams(batch_size=16, epochs=4, lr=1e-3), 0.0),
        HeadTask(
            TrainParams(batch_size=16, epochs=4, lr=3e37), 0.0
        ),  # diverges: Adam steps by ~lr, logits overflow
        HeadTask(TrainParams(batch_size=16, epochs=4, lr=3e-3), 0.0),
    ]
    seen: list[tuple[int, int]] = []

    class Pruned(Exception):
        pass

    def on_epoch(i: int, record: object) -> None:
        seen.append((i, record.epoch))  # type: ignore[attr-defined]
        if i == 2 and record.epoch == 2:  # type: ignore[attr-defined]
            raise Pruned()

    out = fit_heads(
        tasks, weight, bias, train, digits[0].labels, val, digits[1].labels, on_epoch=on_epoch
    )
    assert isinstance(out[0], FitResult) and len(out[0].history) == 4
    assert isinstance(out[1], NonFiniteLoss)
    assert isinstance(out[2], Pruned)
    assert [e for i, e in seen if i == 0] == [1, 2, 3, 4]
    assert [e for i, e in seen if i == 2] == [1, 2]
    assert math.isfinite(out[0].best_val_loss)


def test_a_storage_error_ends_the_whole_batch(
    digits: tuple[ImageSet, ImageSet],  # noqa: F811
) -> None:
    """A prune ends one trial; a TloptError (storage gone, disk full) is the worker's to handle."""
    from tlopt.errors import StorageError

    train, val, weight, bias = _features(digits)
    tasks = [HeadTask(TrainParams(batch_size=16, epochs=3, lr=1e-3), 0.0)] * 2

    def on_epoch(i: int, record: object) -> None:
        raise StorageError("the storage refused reporting an epoch")

    with pytest.raises(StorageError):
        fit_heads(
            tasks, weight, bias, train, digits[0].labels, val, digits[1].labels, on_epoch=on_epoch
        )
