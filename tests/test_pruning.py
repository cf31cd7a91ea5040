"""What the pruner sees of a trial: every trained epoch, never the inherited head (epoch 0)."""

from __future__ import annotations

import math

import optuna
import pytest

from tlopt.train.ledger import EpochRecord
from tlopt.tune.objective import report


def _epoch(epoch: int, val_loss: float) -> EpochRecord:
    nan = math.nan
    train = (nan, nan) if epoch == 0 else (val_loss, 0.5)
    return EpochRecord(epoch, *train, val_loss, 0.5, 0.0 if epoch == 0 else 1e-4, 0.1)


def _run(trial: optuna.Trial, losses: list[float]) -> list[EpochRecord]:
    """Report ``losses`` (epoch 0 first, the inherited head) as a fine-tuning trial does."""
    history: list[EpochRecord] = []
    for epoch, loss in enumerate(losses):
        record = _epoch(epoch, loss)
        history.append(record)
        report(trial, "median", record, len(losses) - 1, history)
    return history


def test_the_inherited_head_does_not_shield_a_bad_fine_tuning_trial(
    sqlite_storage_url: str,
) -> None:
    """Issue 21: a fine-tuning trial at val loss 5.0 is pruned at its first epoch.

    Every trial starts from the same head (0.5 here); fine-tuning's first epochs often lose a
    little of it (0.6, 0.55). Were epoch 0 reported, the median pruner would judge the bad
    trial by its best value, the head's 0.5, which beats the others': never pruned.
    """
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    study = optuna.create_study(storage=sqlite_storage_url, pruner=pruner)
    done = study.ask()
    _run(done, [0.5, 0.6, 0.55])
    study.tell(done, 0.55)

    bad = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 1"):
        _run(bad, [0.5, 5.0, 5.0])
    assert study.trials[0].intermediate_values == {1: 0.6, 2: 0.55}
    frozen = study.trials[1]
    assert frozen.intermediate_values == {1: 5.0}
    # The history keeps epoch 0: the head the trial started from.
    assert [h["epoch"] for h in frozen.user_attrs["history"]] == [0, 1]
    assert frozen.user_attrs["tlopt.prune_reason"] == "median pruner at epoch 1"
