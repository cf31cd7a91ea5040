"""The shared budget: under the storage's lock, count finished and running trials and ask.

Any number of workers share one budget, so a study ends with exactly ``n_trials`` finished
(complete or pruned) trials. Behind the gRPC proxy there is no lock: a worker asks first and
then checks its place, and a trial that lost the race is failed, or queued again if it was a
retry (see :func:`over_budget`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from tlopt.names import ATTR
from tlopt.tune import continuation
from tlopt.tune.resilience import BEAT, beat_once, fail_stale_trials, retrying
from tlopt.tune.sampling import TAKEN_STATES, point
from tlopt.tune.storage import budget_lock, has_budget_lock

log = logging.getLogger("tlopt.worker")


def next_trials(
    study: optuna.Study,
    storage: BaseStorage,
    study_name: str,
    budget: int,
    k: int = 1,
    interval: int | None = None,
    propose: Callable[[optuna.Trial, set[tuple[Any, ...]]], optuna.Trial] | None = None,
) -> tuple[list[optuna.Trial], bool]:
    """(up to ``k`` new trials, none to wait; whether the budget is reached), under the lock.

    Each trial gets its heartbeat as soon as it is asked for, and then (``propose``) its
    parameters, unlike those of every running or finished trial, while the lock keeps others
    out.
    """
    with budget_lock(storage, study_name):
        fail_stale_trials(study, storage)  # a dead worker's trial is failed and re-queued here
        finished, running = count_trials(study)
        room = budget - finished - running
        if continuation.waiting(study):  # more epochs for a point that ran: past the budget
            room = max(room, 1)
        elif finished >= budget:
            return [], True
        taken = {point(t.params) for t in study.get_trials(deepcopy=False, states=TAKEN_STATES)}
        trials = []
        for _ in range(min(k, room)):
            trial = study.ask()
            beat_once(storage, trial._trial_id, interval)
            trials.append(propose(trial, taken) if propose else trial)
        if len(trials) > 1:  # the first ones' beats are as old as the proposals of the others
            for trial in trials:
                beat_once(storage, trial._trial_id, interval)
    if not has_budget_lock(storage):
        trials = [t for t in trials if not over_budget(study, storage, t, budget)]
    return trials, False


def count_trials(study: optuna.Study, before: int | None = None) -> tuple[int, int]:
    """(finished trials, running trials numbered below ``before``, or all running), of those
    that count towards the budget: continuations do not (tlopt.tune.continuation)."""
    trials = [t for t in study.get_trials(deepcopy=False) if not continuation.is_continuation(t)]
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    running = sum(
        t.state == TrialState.RUNNING and (before is None or t.number < before) for t in trials
    )
    return finished, running


# System attributes of a trial that was queued rather than sampled: a point enqueued by hand
# or by tlopt (fixed_params), a retry of a trial whose worker died (Optuna's
# RetryHeartbeatStaleTrialCallback writes failed_trial and retry_history).
QUEUED = ("fixed_params", "failed_trial", "retry_history")


def over_budget(
    study: optuna.Study, storage: BaseStorage, trial: optuna.Trial, budget: int
) -> bool:
    """Without a budget lock (behind the gRPC proxy): whether another worker got the last place.

    Trials are numbered in creation order, so the running trials numbered below this one came
    first: this one runs only if the finished trials and those leave room for it. A trial that
    does not is ended FAIL with the reason and never run; one that was queued (a retry, an
    enqueued point) is queued again with its parameters, its checkpoint and its retry history.
    """
    finished, ahead = count_trials(study, before=trial.number)
    if finished + ahead < budget or continuation.of(trial) is not None:
        return False
    frozen = storage.get_trial(trial._trial_id)
    trial.set_user_attr(ATTR + "error", "over budget: another worker took the last trial")
    tell_trial(study, trial, None, TrialState.FAIL)
    if any(key in frozen.system_attrs for key in QUEUED):
        queue_again(study, frozen)
    return True


def queue_again(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
    """Queue an unrun trial again as it was: parameters, checkpoint, retry history."""
    system_attrs = {
        k: v
        for k, v in frozen.system_attrs.items()
        if k != BEAT and not k.startswith("tpe:relative_params")  # this run's, not the point's
    }
    fixed = {**system_attrs.get("fixed_params", {}), **frozen.params}
    if fixed:
        system_attrs["fixed_params"] = fixed
    retrying(
        f"queueing trial {frozen.number} again",
        lambda: study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=frozen.params,
                distributions=frozen.distributions,
                user_attrs=frozen.user_attrs,
                system_attrs=system_attrs,
                intermediate_values=frozen.intermediate_values,
            )
        ),
    )


def tell_trial(
    study: optuna.Study, trial: optuna.Trial, value: float | None, state: TrialState
) -> bool:
    """``study.tell`` with retries; whether the trial ended as told.

    Idempotent: a tell that already landed (an attempt committed before the connection
    dropped) is not an error, and neither is a trial that another process ended meanwhile (the
    stale check of another worker or of the storage proxy failed it and queued it again):
    that costs one log line and this run's result, never the worker.
    """
    frozen = retrying(
        f"recording trial {trial.number}",
        lambda: study.tell(trial, value, state=state, skip_if_finished=True),
    )
    if frozen.state == state:
        return True
    log.warning(
        "trial %d was ended elsewhere (%s) while it ran here, and queued again there: this "
        "worker's %s is dropped",
        trial.number,
        frozen.state.name,
        state.name,
    )
    return False
