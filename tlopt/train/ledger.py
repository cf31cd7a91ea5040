"""One run's epoch bookkeeping, the same for every training loop.

``fit`` (one model) and ``fit_heads`` (K linear heads at once) differ in how a step computes;
what an epoch means does not: the rate of each step (decay, then warm-up), the record, the
best epoch and its weights, the non-finite check, patience and the last epoch. A
:class:`Ledger` holds that for one run, so a head trial trained among K others and the same
trial trained alone are judged by the same lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tlopt.schedules import batch_scale, lr_factor, warmup_factor


class Interrupted(RuntimeError):
    """``should_stop`` said to stop (the worker got SIGTERM or SIGINT)."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite (the learning rate is usually too high)."""


@dataclass(frozen=True)
class TrainParams:
    """Everything one training run needs besides the model and the data."""

    batch_size: int
    epochs: int
    lr: float = 1e-3
    decay: str = "constant"
    decay_params: dict[str, float] = field(default_factory=dict)
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    patience: int = 0  # 0: no early stopping
    flip: bool = True
    bn_train: bool = False  # BatchNorm in train mode (batch statistics); see set_train_mode
    warmup_epochs: float = 0.0  # linear warm-up of the rate, per step (fractions allowed)
    layer_decay: float = 1.0  # rate scale per timm block group from the head down; 1: off
    lr_batch_size: int = 0  # lr is the rate at this batch size (batch_scale); 0: as written
    label_smoothing: float = 0.0  # of the training loss; validation loss stays plain
    crop_scale: float = 1.0  # random-resized crops keep at least this share of the image; 1: off


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class FitResult:
    history: list[EpochRecord]
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    best_state: dict[str, torch.Tensor]
    stopped_early: bool = False


def check_stop(should_stop: Callable[[], bool] | None, epoch: int) -> None:
    """Raise :class:`Interrupted` when the caller's stop request is up (checked every step)."""
    if should_stop is not None and should_stop():
        raise Interrupted(f"stopped in epoch {epoch + 1}")


class Ledger:
    """The epochs of one run: rates, history, best epoch, patience (see the module doc)."""

    def __init__(
        self,
        params: TrainParams,
        history: list[EpochRecord] | None = None,
        best: dict[str, Any] | None = None,
    ):
        self.params = params
        self.history: list[EpochRecord] = list(history or [])
        self.best: dict[str, Any] = best or {
            "loss": math.inf,
            "accuracy": 0.0,
            "epoch": -1,
            "state": {},
        }
        self.stopped_early = False
        self._epoch_lr = 0.0

    @property
    def next_epoch(self) -> int:
        """The 0-based epoch to train next (after a resumed checkpoint's last one)."""
        return self.history[-1].epoch if self.history else 0

    def steps(self, n: int) -> int:
        """Steps in an epoch of ``n`` training items."""
        return math.ceil(n / self.params.batch_size)

    def begin_epoch(self, epoch: int) -> None:
        p = self.params
        scale = batch_scale(p.batch_size, p.lr_batch_size)
        self._epoch_lr = p.lr * scale * lr_factor(p.decay, epoch, p.epochs, **p.decay_params)

    def step_lr(self, epoch: int, step: int, steps: int) -> float:
        """The rate of step ``step`` (0-based) of ``steps`` in ``epoch``: decay, then warm-up."""
        return self._epoch_lr * warmup_factor(epoch + (step + 1) / steps, self.params.warmup_epochs)

    def record_start(self, val_loss: float, val_accuracy: float, seconds: float) -> EpochRecord:
        """Epoch 0: the model before its first step (train figures NaN); never the best."""
        nan = float("nan")
        record = EpochRecord(0, nan, nan, val_loss, val_accuracy, 0.0, seconds)
        self.history.append(record)
        return record

    def end_epoch(
        self,
        epoch: int,
        train: tuple[float, float],
        val: tuple[float, float],
        lr: float,
        seconds: float,
        state: Callable[[], dict[str, torch.Tensor]],
    ) -> EpochRecord:
        """Record epoch ``epoch`` (0-based) from its (loss, accuracy) pairs.

        ``state`` is called only when the epoch is the best so far, for the weights to keep.

        Raises:
            NonFiniteLoss: the training or validation loss is NaN or infinite.
        """
        (train_loss, train_acc), (val_loss, val_acc) = train, val
        for what, value in (("training", train_loss), ("validation", val_loss)):
            if not math.isfinite(value):
                raise NonFiniteLoss(f"{what} loss became {value} in epoch {epoch + 1}")
        record = EpochRecord(epoch + 1, train_loss, train_acc, val_loss, val_acc, lr, seconds)
        self.history.append(record)
        if val_loss < self.best["loss"]:
            self.best = {"loss": val_loss, "accuracy": val_acc, "epoch": epoch + 1}
            self.best["state"] = state()
        return record

    def goes_on(self) -> bool:
        """Whether another epoch follows the last recorded one (patience, then the count)."""
        p, last = self.params, self.next_epoch
        if p.patience and self.best["epoch"] > 0 and last - self.best["epoch"] >= p.patience:
            self.stopped_early = True
            return False
        return last < p.epochs

    def result(self) -> FitResult:
        b = self.best
        return FitResult(
            self.history, b["epoch"], b["loss"], b["accuracy"], b["state"], self.stopped_early
        )
