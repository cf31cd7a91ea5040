"""The one training loop: seeded, cached path equal to the plain path, NaN, early stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlopt.models.backbones import create_backbone, normalization
from tlopt.models.stages import apply_stage, parse_stage
from tlopt.train import trainer
from tlopt.train.data import ImageSet
from tlopt.train.ledger import NonFiniteLoss, TrainParams
from tlopt.train.trainer import fit

SIZE = 32


@pytest.fixture(scope="module")
def digits() -> tuple[ImageSet, ImageSet]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.stack(
        [
            np.asarray(
                Image.fromarray(np.uint8(np.round(x * 255 / 16)))
                .convert("RGB")
                .resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            )
            for x in d.images[:300]
        ]
    )
    labels = d.target[:300]
    mean, std = (0.5,) * 3, (0.5,) * 3
    return (
        ImageSet.from_arrays(images[:200], labels[:200], mean, std),
        ImageSet.from_arrays(images[200:], labels[200:], mean, std),
    )


def run(stage: str, data: tuple[ImageSet, ImageSet], **kw: object) -> trainer.FitResult:
    torch.manual_seed(0)
    model = create_backbone("test_efficientnet", "none", num_classes=10, drop_rate=0.1)
    apply_stage(model, parse_stage(stage))
    params = TrainParams(**{"batch_size": 16, "epochs": 3, "lr": 3e-3, **kw})  # type: ignore[arg-type]
    return fit(model, data[0], data[1], params, seed=1)


def test_same_seed_same_history(digits: tuple[ImageSet, ImageSet]) -> None:
    a = run("freeze1", digits)
    b = run("freeze1", digits)
    assert [r.val_loss for r in a.history] == [r.val_loss for r in b.history]
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    assert a.best_val_loss == min(r.val_loss for r in a.history)


@pytest.mark.parametrize("stage", ["head", "freeze2"])
def test_cached_prefix_matches_plain_path(
    stage: str, digits: tuple[ImageSet, ImageSet], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tolerance: 1e-4 relative on each epoch's validation loss (float32 summation order)."""
    cached = run(stage, digits)
    monkeypatch.setattr(trainer, "CACHE_LIMIT_BYTES", 0)  # forces the prefix per batch
    plain = run(stage, digits)
    np.testing.assert_allclose(
        [r.val_loss for r in cached.history], [r.val_loss for r in plain.history], rtol=1e-4
    )


def test_no_tensor_is_made_on_the_host_per_step(
    digits: tuple[ImageSet, ImageSet], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Normalisation constants are made once per data set, not per batch: on a GPU each
    ``torch.tensor`` in a step is a blocking host-to-device copy. So the count of
    ``torch.tensor`` calls in a fit and a predict does not grow with the number of steps."""
    from tlopt.train.descriptors import predict

    made = 0
    real = torch.tensor

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal made
        made += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    # Random crops and no feature cache: the images are normalised at every step, train and
    # validation alike, as in full and scratch trials and uncached prefixes.
    monkeypatch.setattr(trainer, "CACHE_LIMIT_BYTES", 0)

    model = create_backbone("test_efficientnet", "none", num_classes=10)
    run("freeze2", digits, epochs=1, crop_scale=0.5)  # one-off work (the split's check) first

    def tensors_made(batch_size: int) -> int:
        nonlocal made
        made = 0
        with monkeypatch.context() as patch:
            patch.setattr(torch, "tensor", counted)
            result = run("freeze2", digits, batch_size=batch_size, epochs=1, crop_scale=0.5)
            predict(model, digits[1], batch_size=batch_size)
        assert len(result.history) == 1
        return made

    assert tensors_made(8) == tensors_made(32)  # 25 and 7 steps, 13 and 4 predict batches


def test_non_finite_loss_is_reported(digits: tuple[ImageSet, ImageSet]) -> None:
    with pytest.raises(NonFiniteLoss, match="epoch 1"):
        run("full", digits, lr=1e8, optimizer="sgd", epochs=2)


def test_early_stopping_and_best_epoch_weights(digits: tuple[ImageSet, ImageSet]) -> None:
    result = run("head", digits, epochs=40, lr=0.5, optimizer="sgd", patience=2)
    assert result.stopped_early and len(result.history) < 40
    assert len(result.history) - result.best_epoch == 2


def test_learning_rate_follows_the_schedule(digits: tuple[ImageSet, ImageSet]) -> None:
    result = run(
        "head", digits, epochs=4, decay="step", decay_params={"step_size": 2, "gamma": 0.1}
    )
    assert [round(r.lr, 8) for r in result.history] == [3e-3, 3e-3, 3e-4, 3e-4]


def test_normalisation_and_flip() -> None:
    images = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3) * 7
    data = ImageSet.from_arrays(images, np.zeros(2), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = data.batch(torch.tensor([0, 1]), torch.tensor([False, True]))
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x[0], expected[0])
    torch.testing.assert_close(x[1], expected[1].flip(-1))


@pytest.mark.parametrize(
    ("arch", "mean", "std"),
    [
        ("test_resnet", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("test_efficientnet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    ],
)
def test_normalization_is_the_pretrained_cfg_of_the_model(
    arch: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    """The mean/std the images are normalised with are those timm's weights were trained with."""
    model = create_backbone(arch, "none")
    assert (model.pretrained_cfg["mean"], model.pretrained_cfg["std"]) == (mean, std)
    assert normalization(model) == (mean, std)


# About a minute on 2 cores: inductor compiles the step for each batch shape (16 and the last
# epoch batch of 8); the only test of --compile.
@pytest.mark.slow
def test_compiled_step_matches_eager(digits: tuple[ImageSet, ImageSet]) -> None:
    """--compile (torch.compile; CUDA graphs on CUDA) trains to the eager path's losses.

    On the CPU this exercises the compiled path with inductor; tolerance 1e-3 relative on each
    epoch's validation loss (kernels fuse and reorder float32 sums). No dropout: compiled code
    draws its random numbers from another generator.
    """

    def train(compile: bool) -> trainer.FitResult:
        torch.manual_seed(0)
        model = create_backbone("test_efficientnet", "none", num_classes=10, drop_rate=0.0)
        apply_stage(model, parse_stage("freeze2"))
        params = TrainParams(batch_size=16, epochs=2, lr=3e-3)
        return fit(model, digits[0], digits[1], params, seed=1, compile=compile)

    eager, compiled = train(False), train(True)
    np.testing.assert_allclose(
        [r.val_loss for r in compiled.history], [r.val_loss for r in eager.history], rtol=1e-3
    )
