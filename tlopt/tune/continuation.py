"""A trial that continues another: more epochs for a good point, from the weights it kept.

The time a budgeted run gives to its best point (issue 28.2): Hyperband and ASHA continue the
good configurations with more resource; here a fine-tuning trial is continued by a new trial
of the same study with the same parameters, which starts from the weights its parent kept (its
best epoch, ``tlopt.weights``) instead of the head, and trains ``epochs`` more epochs with the
parent's schedule run again from its start (a warm restart, as in SGDR). Its epoch 0 is the
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


@dataclass(frozen=True)
class Continuation:
    """What a continuing trial starts from and how long it trains."""

    trial: int  # the parent's number
    weights: str  # the artifact id of the parent's kept weights (its best epoch's)
    epochs: int  # epochs trained from them
    after: int  # the epochs the weights had trained: epoch k is reported at step after + k

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def of(trial: optuna.trial.BaseTrial | optuna.trial.FrozenTrial) -> Continuation | None:
    """The continuation a trial is (None: an ordinary trial)."""
    raw = trial.user_attrs.get(CONTINUES)
    if not isinstance(raw, dict):
        return None
    return Continuation(
        int(raw["trial"]), str(raw["weights"]), int(raw["epochs"]), int(raw["after"])
    )


def is_continuation(trial: optuna.trial.FrozenTrial) -> bool:
    return isinstance(trial.user_attrs.get(CONTINUES), dict)


def can_continue(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial kept the weights a continuation starts from (a fine-tuning trial that
    was its study's best when it ended)."""
    return bool(trial.user_attrs.get(WEIGHTS)) and "best_epoch" in trial.user_attrs


def enqueue(study: optuna.Study, parent: optuna.trial.FrozenTrial, epochs: int) -> Continuation:
    """Queue a trial of ``study`` that continues ``parent`` for ``epochs`` epochs."""
    if not can_continue(parent):
        raise StudyError(f"trial {parent.number} kept no weights to continue from")
    before = of(parent)
    after = int(parent.user_attrs["best_epoch"]) + (before.after if before else 0)
    c = Continuation(parent.number, str(parent.user_attrs[WEIGHTS]), int(epochs), after)
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
    """The continuation's setting (its epochs) and the weights it starts from."""
    from tlopt.tune.context import download_state

    params = dataclasses.replace(setup.params, epochs=c.epochs)
    try:
        state = download_state(ctx.artifacts, c.weights)
    except Exception as exc:  # a lost artifact: nothing to continue from
        raise StudyError(
            f"the weights of trial {c.trial}, which this trial continues, are unreadable "
            f"({type(exc).__name__}): its own kept weights are what export-best can use"
        ) from exc
    return dataclasses.replace(setup, params=params), state
