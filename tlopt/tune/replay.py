"""A point measured before: a fine-tuning trial whose training would repeat a complete trial's
first epochs takes their figures instead of training them again.

Every trial of a study trains with the study's seed from the same head, so two trials whose
settings differ only in their epochs and their decay train the same steps for as long as their
rates agree (:func:`tlopt.schedules.lr_factor`, epoch by epoch): a 3-epoch ``constant`` trial is
the first 3 epochs of a 6-epoch one, and ``step`` (every 10 epochs) is ``constant`` for 10. TPE
proposes such points: on hymenoptera freeze2 trained 3 epochs of a point after 6 of it, and
freeze1 a ``constant`` point after the same ``step`` one, each time returning the loss of the
one before to eight digits (issue 28).

The repeat reports those epochs to the pruner as its own (so a point the pruner would stop is
stopped) and is recorded as complete, with ``tlopt.same_as`` naming the trial it repeats. When
that trial's best epoch is among them, its value and kept weights are the repeat's too (the
same weights: export-best needs no retrain; a tie leaves the earlier trial the best).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import optuna

from tlopt.names import ATTR, HEAD
from tlopt.schedules import DECAY_TYPES, lr_factor
from tlopt.train.ledger import EpochRecord, FitResult
from tlopt.tune.context import StudyContext
from tlopt.tune.continuation import WEIGHTS, is_continuation
from tlopt.tune.space import TrialSetup

log = logging.getLogger("tlopt.worker")

SAME_AS = ATTR + "same_as"  # a trial's user attribute: the complete trial whose epochs it took


def measured_before(
    trial: optuna.Trial, ctx: StudyContext, setup: TrialSetup
) -> optuna.trial.FrozenTrial | None:
    """A complete trial of the study whose first ``setup``'s epochs are this trial's (None:
    none). Continuations and trials that repeat another are not sources."""
    if ctx.stage.name == "head":
        return None  # head trials train together, on their own seeded generators
    ours, head = _schedule_free(trial.params), json.loads(json.dumps(ctx.head))  # as stored
    mine = {**dataclasses.asdict(setup.params), "dropout": setup.dropout}
    epochs = setup.params.epochs
    setting, rates = _schedule_free(mine), _rates(mine, epochs)
    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for t in done:
        if is_continuation(t) or SAME_AS in t.user_attrs or t.user_attrs.get(HEAD) != head:
            continue
        theirs = t.user_attrs.get(ATTR + "train_params")
        if _schedule_free(t.params) != ours or not isinstance(theirs, dict):
            continue
        if _schedule_free(theirs) != setting or not _trained(t, epochs):
            continue
        if _rates(theirs, epochs) == rates:
            return t
    return None


def replay(
    trial: optuna.Trial,
    source: optuna.trial.FrozenTrial,
    setup: TrialSetup,
    report: Callable[[EpochRecord, list[EpochRecord]], None],
) -> FitResult:
    """``source``'s first epochs as this trial's: each reported (``report`` may prune), then
    the result; the source's value and weights where its best epoch is among them."""
    epochs = setup.params.epochs
    log.info("trial %d: the same training as the first %d epochs of trial %d: their figures, "
             "not trained again", trial.number, epochs, source.number)  # fmt: skip
    trial.set_user_attr(SAME_AS, source.number)
    history: list[EpochRecord] = []
    for raw in source.user_attrs["history"]:
        if raw["epoch"] <= epochs:
            record = EpochRecord(**raw)  # the history keeps 6 digits, the pruner all of them
            record.val_loss = source.intermediate_values.get(record.epoch, record.val_loss)
            history.append(record)
            report(record, history)
    trained = [r for r in history if r.epoch > 0]
    best = min(trained, key=lambda r: (r.val_loss, r.epoch))
    if source.user_attrs.get("best_epoch") == best.epoch and source.value is not None:
        if WEIGHTS in source.user_attrs:
            trial.set_user_attr(WEIGHTS, source.user_attrs[WEIGHTS])
        value, accuracy = (
            source.value,
            float(source.user_attrs.get("val_accuracy", best.val_accuracy)),
        )
    else:
        value, accuracy = best.val_loss, best.val_accuracy
    return FitResult(history, best.epoch, value, accuracy, {})


def _schedule_free(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` less the epochs and the rate schedule (its decay and the decay's own
    parameters, which the trial's params name ``decay.param``)."""
    return {
        k: v
        for k, v in values.items()
        if k not in ("epochs", "decay", "decay_params") and k.split(".")[0] not in DECAY_TYPES
    }


def _trained(t: optuna.trial.FrozenTrial, epochs: int) -> bool:
    """Whether ``t``'s history holds epochs 1..``epochs``."""
    history = t.user_attrs.get("history")
    if not isinstance(history, list):
        return False
    return {r.get("epoch") for r in history if isinstance(r, dict)} >= set(range(1, epochs + 1))


def _rates(params: dict[str, Any], epochs: int) -> list[float]:
    """The rate factors of the first ``epochs`` epochs of a run of ``params`` (train_params):
    ``step`` with its default step of 10 epochs is ``constant`` for the first 10 (hymenoptera's
    freeze1 trained both at batch 8 and lr 1e-5 for 5 epochs: the same five losses)."""
    decay, total = str(params["decay"]), int(params["epochs"])
    extra = dict(params.get("decay_params") or {})
    return [lr_factor(decay, e, total, **extra) for e in range(min(epochs, total))]
