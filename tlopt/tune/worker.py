"""Workers: run a study's trials until it holds its budget of finished trials.

A worker asks for trials under the shared budget (``budget.py``), draws their points
(``sampling.py``), runs them (one at a time, or head trials K at once), tells the study how
each ended, and re-queues what it cannot finish when it is stopped (``outcomes.py``). Every
trial beats from the moment it is asked for (``resilience.py``), so a dead worker's trial
always ends and is retried. ``supervisor.py`` runs one worker process per GPU or CPU slot.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import optuna
import torch
from optuna.storages import BaseStorage
from optuna.trial import TrialState
from tqdm import tqdm

from tlopt.config import StudyConfig
from tlopt.devices import check_device, pick_device
from tlopt.errors import StorageError, TloptError
from tlopt.names import ATTR
from tlopt.progress import bar
from tlopt.train.ledger import Interrupted
from tlopt.tune.budget import next_trials
from tlopt.tune.context import StudyContext, TrialDone
from tlopt.tune.objective import can_batch_heads, head_objectives, objective
from tlopt.tune.outcomes import Stopped, fail_and_requeue, requeue_and_raise, settle
from tlopt.tune.pruners import make_pruner
from tlopt.tune.resilience import heartbeat, retrying
from tlopt.tune.sampling import (
    RESTARTS_ENV,
    env_int,
    make_sampler,
    propose,
    stage_budget,
    worker_slot,
)
from tlopt.tune.storage import mask_url, open_storage, resolve_url
from tlopt.tune.study import load
from tlopt.tune.supervisor import worker_threads

log = logging.getLogger("tlopt.worker")
POLL_SECONDS = 2.0
MAX_FAILURES_IN_A_ROW = 3
DEADLINE_ENV = "TLOPT_DEADLINE"  # a time.time() at which the running trial stops (tune --time)


@dataclass
class WorkerSummary:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    taken: int = 0  # ended by another process while they ran here (a stale-trial check)
    trials: list[int] = field(default_factory=list)


# Set by SIGTERM/SIGINT. The handler only sets it: raising from a signal handler could cut a
# storage transaction in half and leave its lock held. The trainer checks it every batch.
STOP = threading.Event()


def _stop_at(deadline: float) -> Callable[[], bool]:
    """The trainer's stop check (every step): a signal, or the run's deadline passed."""

    said = threading.Event()

    def should_stop() -> bool:
        if STOP.is_set():
            return True
        if time.time() < deadline:
            return False
        if not said.is_set():
            said.set()
            log.warning("worker %d: the run's time is up: the trial stops, queued again",
                        os.getpid())  # fmt: skip
        return True

    return should_stop


def _request_stop(signum: int, _frame: FrameType | None) -> None:
    if not STOP.is_set():
        log.warning(
            "worker %d got %s: stopping after the current batch",
            os.getpid(),
            signal.Signals(signum).name,
        )
    STOP.set()


def work(
    study_name: str,
    storage_url: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    device: str | None = None,
    heads_at_once: int = 1,
    compile: bool = False,
    threads: int | None = None,
    on_trial_done: TrialDone | None = None,
    deadline: float | None = None,
    expect: int | None = None,
) -> WorkerSummary:
    """Run trials of ``study_name`` in this process until the budget or the timeout is reached.

    ``timeout``: no trial starts after it (Optuna's ``timeout``). ``deadline`` (a ``time.time()``,
    default ``$TLOPT_DEADLINE``): the trial running then stops and is queued again, as on
    SIGTERM (``tlopt tune --time`` ends its stages there, to leave time for the export).

    ``heads_at_once``: in a head study, ask up to this many trials at a time and train their
    heads together (``head_objectives``); each is still reported, pruned and told on its own.
    ``threads``: torch's CPU threads (default: ``$OMP_NUM_THREADS`` if set, else 1 on the CPU
    and torch's own on a GPU; see ``supervisor.worker_threads``).
    ``on_trial_done``: what the interface writes for each finished trial (curves, a note).
    ``expect``: the finished trials the study is expected to hold when the time is up (the
    progress bar's total under a time budget; default: the trial budget).
    """
    device = check_device(device)
    slot, restarts = worker_slot(), env_int(RESTARTS_ENV, 0)
    threads = worker_threads(threads, os.environ, pick_device(device).type)
    if threads:
        torch.set_num_threads(threads)
    url = resolve_url(storage_url)
    study = load(study_name, url)
    config = StudyConfig.from_dict(study.user_attrs[ATTR + "config"], study_name)
    storage = open_storage(
        url,
        config.storage.heartbeat_interval,
        config.storage.grace_period,
        config.storage.max_retry,
    )
    # Optuna stores neither sampler nor pruner: every worker builds them from the config.
    pruner = config.pruner
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(config.seed, slot, restarts, study_name),
        pruner=make_pruner(
            pruner.type, pruner.n_startup_trials, pruner.n_warmup_steps, pruner.options
        ),
    )
    budget = n_trials or config.n_trials
    timeout = timeout if timeout is not None else (config.timeout or None)
    STOP.clear()
    if deadline is None and os.environ.get(DEADLINE_ENV):
        deadline = float(os.environ[DEADLINE_ENV])
    ctx = StudyContext.open(
        study,
        device,
        progress=True,
        should_stop=STOP.is_set if deadline is None else _stop_at(deadline),
        compile=compile,
        on_trial_done=on_trial_done,
    )
    budget = stage_budget(budget, ctx.space)  # no point runs twice: a small space stops first
    log.info(
        "worker %d (slot %d) on %s, %d CPU threads, study %s in %s, budget %d finished trials",
        os.getpid(),
        slot,
        ctx.device,
        torch.get_num_threads(),
        study_name,
        mask_url(url),
        budget,
    )
    batch_heads = heads_at_once > 1 and can_batch_heads(ctx)
    if batch_heads:
        log.info("training up to %d heads at once on cached features", heads_at_once)
    summary = WorkerSummary()
    failures = 0  # failed trials do not count towards the budget: stop a loop of them
    began = time.monotonic()
    previous = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    shown = bar(total=min(budget, expect or budget), desc=study_name, unit="trial")
    try:
        while (timeout is None or time.monotonic() - began < timeout) and (
            deadline is None or time.time() < deadline
        ):
            retrying("showing progress", lambda: _show_progress(shown, study))
            if STOP.is_set():
                raise Stopped("signal")
            ask = functools.partial(
                next_trials,
                study,
                storage,
                study_name,
                budget,
                heads_at_once if batch_heads else 1,
                config.storage.heartbeat_interval,
                functools.partial(propose, ctx.space, ctx.stage.name),
            )
            trials, finished = retrying("asking for a trial", ask)
            if finished:
                break
            if not trials:
                time.sleep(POLL_SECONDS)  # the last trials run elsewhere; wait for them
                continue
            ran = _run_heads(study, storage, trials, ctx, config) if len(trials) > 1 else None
            if ran is None:
                ran = _run_each(study, storage, trials, ctx, config)
            for trial, state in zip(trials, ran, strict=True):
                summary.trials.append(trial.number)
                if state is None:  # ended elsewhere while it ran here (logged)
                    summary.taken += 1
                    continue
                failures = failures + 1 if state == TrialState.FAIL else 0
                if failures >= MAX_FAILURES_IN_A_ROW:
                    reason = trial.user_attrs.get(ATTR + "error") or "see the log above"
                    raise TloptError(
                        f"{failures} trials in a row failed (last: {reason}): fix it, then run "
                        "the worker again"
                    )
                if state == TrialState.COMPLETE:
                    summary.complete += 1
                elif state == TrialState.PRUNED:
                    summary.pruned += 1
                else:
                    summary.failed += 1
    except Stopped as stop:
        log.warning("worker %d stopping on %s", os.getpid(), stop)
    finally:
        _show_progress(shown, study)
        shown.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return summary


def _show_progress(shown: tqdm, study: optuna.Study) -> None:
    """The study's finished trials (all workers'), its best value and how many were pruned."""
    if shown.disable:
        return
    trials = study.get_trials(deepcopy=False)
    complete = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    shown.update(len(complete) + pruned - shown.n)
    best = f"{min(complete):.4f}" if complete else "-"
    shown.set_postfix_str(f"best val {best}, {pruned} pruned")


def _run(
    study: optuna.Study,
    trial: optuna.Trial,
    ctx: StudyContext,
    config: StudyConfig,
    beat: contextlib.ExitStack,
) -> TrialState | None:
    """Run one trial while it beats (``beat`` stops its heartbeat), then tell how it ended."""
    outcome: float | BaseException
    try:
        with beat:
            outcome = objective(trial, ctx)
    except (Interrupted, KeyboardInterrupt, StorageError) as exc:
        requeue_and_raise([trial], exc, config.storage.max_retry)
    except Exception as exc:  # a prune, or the trial's own problem: it fails only that trial
        outcome = exc
    return settle(study, trial, outcome)


def _run_each(
    study: optuna.Study,
    storage: BaseStorage,
    trials: list[optuna.Trial],
    ctx: StudyContext,
    config: StudyConfig,
) -> list[TrialState | None]:
    """Run asked trials one after another; if the worker stops, queue the unstarted again.

    Every trial beats from the start, the waiting ones too: they are RUNNING, and a trial
    without beats is failed after the grace period.
    """
    states: list[TrialState | None] = []
    with contextlib.ExitStack() as all_beats:
        beats = []
        for trial in trials:
            beat = all_beats.enter_context(contextlib.ExitStack())
            beat.enter_context(
                heartbeat(storage, trial._trial_id, config.storage.heartbeat_interval)
            )
            beats.append(beat)
        for i, trial in enumerate(trials):
            try:
                states.append(_run(study, trial, ctx, config, beats[i]))
            except BaseException:
                for waiting in trials[i + 1 :]:
                    fail_and_requeue(study, waiting, "worker stopped", config.storage.max_retry)
                raise
    return states


def _run_heads(
    study: optuna.Study,
    storage: BaseStorage,
    trials: list[optuna.Trial],
    ctx: StudyContext,
    config: StudyConfig,
) -> list[TrialState | None] | None:
    """Run head trials together; None if their model needs them one at a time.

    Each trial is told as soon as it ends (a 10-epoch trial does not wait for a 50-epoch one).
    """
    states: dict[int, TrialState | None] = {}

    def tell(i: int, outcome: float | BaseException) -> None:
        states[i] = settle(study, trials[i], outcome)

    with contextlib.ExitStack() as beats:
        for trial in trials:
            beats.enter_context(
                heartbeat(storage, trial._trial_id, config.storage.heartbeat_interval)
            )
        try:
            if head_objectives(trials, ctx, on_outcome=tell) is None:
                return None
        except (Interrupted, KeyboardInterrupt, StorageError) as exc:
            requeue_and_raise(
                [t for i, t in enumerate(trials) if i not in states], exc, config.storage.max_retry
            )
        except Exception as exc:  # a crashed batch fails its trials, not the worker
            for i in range(len(trials)):
                if i not in states:
                    tell(i, exc)
    return [states[i] for i in range(len(trials))]
