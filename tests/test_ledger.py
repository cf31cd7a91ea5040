"""The epoch bookkeeping both training loops share (tlopt.train.ledger)."""

from __future__ import annotations

import math

import pytest
import torch

from tlopt.train.ledger import Interrupted, Ledger, NonFiniteLoss, TrainParams, check_stop


def _end(ledger: Ledger, val_loss: float, train_loss: float = 1.0) -> None:
    epoch = ledger.next_epoch
    ledger.end_epoch(
        epoch, (train_loss, 0.5), (val_loss, 0.5), 1e-3, 0.1, lambda: {"w": torch.tensor(epoch)}
    )


def test_best_epoch_keeps_its_state_and_epoch_zero_is_never_best() -> None:
    ledger = Ledger(TrainParams(batch_size=8, epochs=4))
    ledger.record_start(0.1, 0.9, 0.0)  # better than anything after: still not the best
    for loss in (0.5, 0.3, 0.4, 0.35):
        assert ledger.goes_on()
        _end(ledger, loss)
    assert not ledger.goes_on()
    result = ledger.result()
    assert [r.epoch for r in result.history] == [0, 1, 2, 3, 4]
    assert math.isnan(result.history[0].train_loss)
    assert (result.best_epoch, result.best_val_loss) == (2, 0.3)
    assert int(result.best_state["w"]) == 1  # the state taken at the end of epoch 2 (index 1)
    assert not result.stopped_early


@pytest.mark.parametrize("patience, epochs_run", [(1, 2), (2, 3), (3, 4), (0, 5)])
def test_patience_stops_after_that_many_epochs_without_a_better_one(
    patience: int, epochs_run: int
) -> None:
    ledger = Ledger(TrainParams(batch_size=8, epochs=5, patience=patience))
    losses = iter([0.5, 0.6, 0.7, 0.8, 0.9])
    while ledger.goes_on():
        _end(ledger, next(losses))
    assert ledger.next_epoch == epochs_run
    assert ledger.stopped_early == (epochs_run < 5)


def test_patience_does_not_stop_a_run_that_has_not_trained() -> None:
    ledger = Ledger(TrainParams(batch_size=8, epochs=3, patience=1))
    ledger.record_start(0.2, 0.9, 0.0)
    assert ledger.goes_on()


@pytest.mark.parametrize("train, val", [(math.nan, 0.5), (1.0, math.inf)])
def test_a_non_finite_loss_raises(train: float, val: float) -> None:
    ledger = Ledger(TrainParams(batch_size=8, epochs=3))
    with pytest.raises(NonFiniteLoss, match="in epoch 1"):
        _end(ledger, val, train)


def test_step_rates_decay_per_epoch_and_warm_up_per_step() -> None:
    params = TrainParams(
        batch_size=8, epochs=4, lr=1.0, decay="step", decay_params={"step_size": 2, "gamma": 0.5},
        warmup_epochs=1.0,
    )  # fmt: skip
    ledger = Ledger(params)
    rates = []
    for epoch in range(4):
        ledger.begin_epoch(epoch)
        rates.append([ledger.step_lr(epoch, s, 4) for s in range(4)])
    assert rates == [[0.25, 0.5, 0.75, 1.0], [1.0] * 4, [0.5] * 4, [0.5] * 4]


def test_resume_continues_from_the_recorded_history() -> None:
    first = Ledger(TrainParams(batch_size=8, epochs=3))
    _end(first, 0.4)
    resumed = Ledger(first.params, first.history, first.best)
    assert resumed.next_epoch == 1 and resumed.goes_on()
    _end(resumed, 0.5)
    _end(resumed, 0.2)
    assert resumed.result().best_epoch == 3


def test_check_stop() -> None:
    check_stop(None, 0)
    check_stop(lambda: False, 0)
    with pytest.raises(Interrupted, match="epoch 3"):
        check_stop(lambda: True, 2)
