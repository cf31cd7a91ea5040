"""How a trial's end is recorded: its value, a prune, or a failure with its reason; and, when
the worker stops (a signal) or loses the storage, its trials failed and queued again, once.

Every write is idempotent (DESIGN.md, Invariants): a trial that another process ended while it
ran here (a stale check failed it and queued it again) costs a log line, never the worker.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import NoReturn

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tlopt.devices import free_after
from tlopt.names import ATTR
from tlopt.train.ledger import Interrupted
from tlopt.tune.budget import tell_trial
from tlopt.tune.resilience import retrying

log = logging.getLogger("tlopt.worker")


class Stopped(Exception):
    """SIGTERM or SIGINT: the worker finishes cleanly."""


def requeue_and_raise(trials: list[optuna.Trial], exc: BaseException, max_retry: int) -> NoReturn:
    """The worker stops (a signal) or loses the storage: queue its trials again."""
    stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
    why = "worker stopped" if stopped else str(exc).splitlines()[0][:500]
    for trial in trials:
        fail_and_requeue(trial.study, trial, why, max_retry)
    if stopped:
        raise Stopped("signal") from None
    raise exc


def settle(
    study: optuna.Study, trial: optuna.Trial, outcome: float | BaseException
) -> TrialState | None:
    """Tell the study how a trial ended: its value, a prune, or a failure with its reason.

    None: the trial was ended elsewhere while it ran here (a write found it finished, or the
    tell did), and has been queued again there; the worker goes on.
    """
    if isinstance(outcome, optuna.exceptions.UpdateFinishedTrialError):
        state = retrying("reading a trial", lambda: study._storage.get_trial(trial._trial_id)).state
        log.warning(
            "trial %d was ended elsewhere (%s) while it ran here, and queued again there: "
            "this worker goes on",
            trial.number,
            state.name,
        )
        return None
    if isinstance(outcome, optuna.TrialPruned):
        log.info("trial %d pruned: %s", trial.number, outcome)
        return TrialState.PRUNED if tell_trial(study, trial, None, TrialState.PRUNED) else None
    if isinstance(outcome, BaseException):
        if isinstance(outcome, torch.cuda.OutOfMemoryError):
            free_after(outcome)  # before the next trial: drop fit's frames, empty the cache
            reason = (
                f"CUDA out of memory at batch size {trial.params.get('batch_size')}: lower "
                "search.batch_size or data.image_size, or use fewer --per-gpu"
            )
        else:
            reason = f"{type(outcome).__name__}: {outcome}".splitlines()[0][:500]
        log.error("trial %d failed: %s", trial.number, reason)
        record = functools.partial(trial.set_user_attr, ATTR + "error", reason)
        # Failed already: the stale check of another worker judged its heartbeat too old.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            retrying("recording a failure", record)
        return TrialState.FAIL if tell_trial(study, trial, None, TrialState.FAIL) else None
    if not tell_trial(study, trial, outcome, TrialState.COMPLETE):
        return None
    log.info(
        "trial %d complete: val_loss %.4f  val_acc %.4f",
        trial.number,
        outcome,
        trial.user_attrs.get("val_accuracy", float("nan")),
    )
    return TrialState.COMPLETE


def fail_and_requeue(study: optuna.Study, trial: optuna.Trial, why: str, max_retry: int) -> None:
    """Fail an interrupted trial and queue it again with the same parameters, once.

    A trial that another process failed meanwhile (and queued again) is left as it is, so
    the worker goes on to re-queue the rest of its trials.
    """
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        retrying("recording why", lambda: trial.set_user_attr(ATTR + "error", why))
    tell_trial(study, trial, None, TrialState.FAIL)
    if retrying("looking for a retry", lambda: _has_retry(study, trial.number)):
        return
    frozen = retrying("reading a trial", lambda: study._storage.get_trial(trial._trial_id))
    retrying(
        f"queueing trial {trial.number} again",
        lambda: RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)(
            study, frozen
        ),
    )


def _has_retry(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number`` was queued again already (Optuna's retry callback).

    A retry's history ends with the trial it retries. Not its ``failed_trial``: every retry
    in a chain holds the first trial's number there (a retry of retry 5 of trial 0 says 0).
    """
    history = RetryHeartbeatStaleTrialCallback.retry_history
    return any(history(t)[-1:] == [number] for t in study.get_trials(deepcopy=False))
