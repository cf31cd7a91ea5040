"""A trial that continues another: more epochs for a good point, from the weights it kept.

The time a budgeted run gives to its best point (issue 28.2): Hyperband and ASHA continue the
good configurations with more resource; here a fine-tuning trial is continued by a new trial
of the same study with the same parameters, which starts from the weights its parent kept (its
best epoch, ``tlopt.weights``) instead of the head, and trains ``epochs`` more epochs with the
parent's schedule run again from its start (a warm restart, as in SGDR), at ``rate`` times the
parent's rate: :data:`EARLY_RATE` of it for a parent whose first epoch was its best of two or
more (every further epoch at its rate lost what the first found), the same rate otherwise.
Measured (README, Accuracy): hymenoptera's freeze1 point, best at epoch 1 of 3, continued at a
tenth went from 0.1394 to 0.1211 and at its rate stayed at 0.1394; the digits' freeze1 point,
best at epoch 10 of 20, gained at its rate (0.1757 to 0.1261) and nothing at a tenth. Its
epoch 0 is the
parent's best model, evaluated; its epochs are reported to the pruner after the parent's best
epoch, so the median it is judged by is that of trials as far along.

It is otherwise an ordinary trial: the study's best may be it, its weights are kept when it is,
and export-best loads them or retrains it from the same start. Continuations do not count
towards a study's trial budget (they are epochs, not points), and a queued one runs even when
the budget is reached (:func:`waiting`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlopt.errors import StudyError
from tlopt.names import ATTR, HEAD

if TYPE_CHECKING:
    import optuna
    import torch

    from tlopt.tune.context import StudyContext
    from tlopt.tune.space import TrialSetup

CONTINUES = ATTR + "continues"  # a trial's user attribute: the trial it continues (Continuation)
WEIGHTS = ATTR + "weights"  # a trial's trained weights, kept when it was the study's best
# The rate factor a continuation of a parent whose first epoch was its best takes: a tenth,
# the step between the fine-tuning stages' rates (FINE_TUNE_LR_FACTORS) twice over.
EARLY_RATE = 0.1


@dataclass(frozen=True)
class Continuation:
    """What a continuing trial starts from and how long it trains."""

    trial: int  # the parent's number
    weights: str  # the artifact id of the parent's kept weights (its best epoch's)
    epochs: int  # epochs trained from them
    after: int  # the epochs the weights had trained: epoch k is reported at step after + k
    rate: float = 1.0  # times the trial's rate (its ``lr`` parameter, which it shares)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def of(trial: optuna.trial.BaseTrial | optuna.trial.FrozenTrial) -> Continuation | None:
    """The continuation a trial is (None: an ordinary trial)."""
    raw = trial.user_attrs.get(CONTINUES)
    if not isinstance(raw, dict):
        return None
    rate = float(raw.get("rate", 1.0))  # a continuation queued before rates: the same rate
    return Continuation(
        int(raw["trial"]), str(raw["weights"]), int(raw["epochs"]), int(raw["after"]), rate
    )


def is_continuation(trial: optuna.trial.FrozenTrial) -> bool:
    return isinstance(trial.user_attrs.get(CONTINUES), dict)


def can_continue(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial kept the weights a continuation starts from (a fine-tuning trial that
    was its study's best when it ended)."""
    return bool(trial.user_attrs.get(WEIGHTS)) and "best_epoch" in trial.user_attrs


def rate_after(parent: optuna.trial.FrozenTrial) -> float:
    """The rate factor a continuation of ``parent`` trains at: the parent's own, times
    :data:`EARLY_RATE` when its first epoch was its best and it trained more."""
    before = of(parent)
    planned = before.epochs if before else parent.params.get("epochs")
    trained = int(parent.user_attrs.get("epochs_run") or planned or 0)
    own = before.rate if before else 1.0
    first_was_best = int(parent.user_attrs["best_epoch"]) <= 1 < trained
    return own * EARLY_RATE if first_was_best else own


def enqueue(study: optuna.Study, parent: optuna.trial.FrozenTrial, epochs: int) -> Continuation:
    """Queue a trial of ``study`` that continues ``parent`` for ``epochs`` epochs, at the rate
    :func:`rate_after` gives."""
    if not can_continue(parent):
        raise StudyError(f"trial {parent.number} kept no weights to continue from")
    before = of(parent)
    after = int(parent.user_attrs["best_epoch"]) + (before.after if before else 0)
    c = Continuation(
        parent.number, str(parent.user_attrs[WEIGHTS]), int(epochs), after, rate_after(parent)
    )
    attrs: dict[str, Any] = {CONTINUES: c.as_dict()}
    if HEAD in parent.user_attrs:  # the head its line of trials grew from, for export-best
        attrs[HEAD] = parent.user_attrs[HEAD]
    study.enqueue_trial(dict(parent.params), user_attrs=attrs)
    return c


def progress(study: optuna.Study, parent: int) -> str | None:
    """Where the continuation of trial ``parent`` stands: None (there is none), "queued" (a
    stopped run's, with its checkpoint: it resumes), "running" (here or elsewhere, or killed
    and not yet failed as stale) or "ended" (a second from the same weights would train the
    same epochs again)."""
    from optuna.trial import TrialState

    states = {t.state for t in study.get_trials(deepcopy=False)
              if (c := of(t)) is not None and c.trial == parent}  # fmt: skip
    if not states:
        return None
    if TrialState.WAITING in states:
        return "queued"
    return "running" if TrialState.RUNNING in states else "ended"


def waiting(study: optuna.Study) -> bool:
    """Whether a continuation is queued (it runs even when the trial budget is reached)."""
    from optuna.trial import TrialState

    queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return any(is_continuation(t) for t in queued)


def start(
    c: Continuation, ctx: StudyContext, setup: TrialSetup
) -> tuple[TrialSetup, dict[str, torch.Tensor]]:
    """The continuation's setting (its epochs and rate) and the weights it starts from."""
    from tlopt.tune.context import download_state

    params = dataclasses.replace(setup.params, epochs=c.epochs, lr=setup.params.lr * c.rate)
    try:
        state = download_state(ctx.artifacts, c.weights)
    except Exception as exc:  # a lost artifact: nothing to continue from
        raise StudyError(
            f"the weights of trial {c.trial}, which this trial continues, are unreadable "
            f"({type(exc).__name__}): its own kept weights are what export-best can use"
        ) from exc
    return dataclasses.replace(setup, params=params), state
