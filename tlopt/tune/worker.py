"""Workers: run a study's trials until it holds its budget of finished trials.

Any number of workers, on any number of machines, share one budget: each one counts the
finished and running trials and asks for a new trial under a lock held in the storage
(``budget_lock``), so the study ends with exactly ``n_trials`` finished (complete or pruned)
trials. A worker whose trial is still running elsewhere waits for it, so a trial failed by the
heartbeat and re-queued is always picked up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import NoReturn

import optuna
import torch
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import fail_stale_trials
from optuna.trial import TrialState

from tlopt.config import StudyConfig
from tlopt.errors import TloptError
from tlopt.train.trainer import Interrupted
from tlopt.tune.context import ATTR, StudyContext
from tlopt.tune.objective import can_batch_heads, head_objectives, objective
from tlopt.tune.pruners import make_pruner
from tlopt.tune.resilience import heartbeat, retrying
from tlopt.tune.storage import budget_lock, has_budget_lock, mask_url, open_storage, resolve_url
from tlopt.tune.study import load

log = logging.getLogger("tlopt.worker")
POLL_SECONDS = 2.0
MAX_FAILURES_IN_A_ROW = 3


@dataclass
class WorkerSummary:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    trials: list[int] = field(default_factory=list)


class _Stop(Exception):
    """SIGTERM or SIGINT: finish cleanly."""


# Set by SIGTERM/SIGINT. The handler only sets it: raising from a signal handler could cut a
# storage transaction in half and leave its lock held. The trainer checks it every batch.
STOP = threading.Event()


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
) -> WorkerSummary:
    """Run trials of ``study_name`` in this process until the budget or the timeout is reached.

    ``heads_at_once``: in a head study, ask up to this many trials at a time and train their
    heads together (``head_objectives``); each is still reported, pruned and told on its own.
    """
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
    # Each worker seeds its sampler differently, or concurrent workers would propose the same
    # parameters; the sampled sequence is therefore reproducible only within one worker.
    pruner = config.pruner
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=(config.seed * 1_000_003 + os.getpid()) % 2**32),
        pruner=make_pruner(
            pruner.type, pruner.n_startup_trials, pruner.n_warmup_steps, pruner.options
        ),
    )
    budget = n_trials or config.n_trials
    timeout = timeout if timeout is not None else (config.timeout or None)
    ctx = StudyContext(study, device, progress=True)
    log.info(
        "worker %d on %s, study %s in %s, budget %d finished trials",
        os.getpid(),
        ctx.device,
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
    STOP.clear()
    ctx.should_stop = STOP.is_set
    ctx.compile = compile
    previous = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while timeout is None or time.monotonic() - began < timeout:
            if STOP.is_set():
                raise _Stop("signal")
            ask = functools.partial(
                _next_trials,
                study,
                storage,
                study_name,
                budget,
                heads_at_once if batch_heads else 1,
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
    except _Stop as stop:
        log.warning("worker %d stopping on %s", os.getpid(), stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return summary


def _next_trials(
    study: optuna.Study, storage: BaseStorage, study_name: str, budget: int, k: int = 1
) -> tuple[list[optuna.Trial], bool]:
    """(up to ``k`` new trials, none to wait; whether the budget is reached), under the lock."""
    fail_stale_trials(study)  # a dead worker's trial is failed and re-queued here
    with budget_lock(storage, study_name):
        finished, running = _count(study)
        if finished >= budget:
            return [], True
        trials = [study.ask() for _ in range(min(k, budget - finished - running))]
    if not has_budget_lock(storage):
        trials = [t for t in trials if not _over_budget(study, t, budget)]
    return trials, False


def _count(study: optuna.Study, before: int | None = None) -> tuple[int, int]:
    """(finished trials, running trials numbered below ``before``, or all running)."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    running = sum(
        t.state == TrialState.RUNNING and (before is None or t.number < before) for t in trials
    )
    return finished, running


def _over_budget(study: optuna.Study, trial: optuna.Trial, budget: int) -> bool:
    """Without a budget lock (behind the gRPC proxy): whether another worker got the last place.

    Trials are numbered in creation order, so the running trials numbered below this one came
    first: this one runs only if the finished trials and those leave room for it. A trial that
    does not is ended FAIL with the reason and never run; one that was queued (a retry) is
    queued again with its parameters, its checkpoint and its retry history.
    """
    finished, ahead = _count(study, before=trial.number)
    if finished + ahead < budget:
        return False
    frozen = study._storage.get_trial(trial._trial_id)
    trial.set_user_attr(ATTR + "error", "over budget: another worker took the last trial")
    _tell(study, trial, None, TrialState.FAIL)
    if "fixed_params" in frozen.system_attrs:
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                user_attrs=frozen.user_attrs,
                system_attrs=frozen.system_attrs,
                intermediate_values=frozen.intermediate_values,
            )
        )
    return True


def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None, state: TrialState) -> None:
    def tell() -> None:
        # UpdateFinishedTrialError: an earlier attempt committed before the connection dropped.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study.tell(trial, value, state=state)

    retrying(f"recording trial {trial.number}", tell)


def _run(
    study: optuna.Study,
    storage: BaseStorage,
    trial: optuna.Trial,
    ctx: StudyContext,
    config: StudyConfig,
) -> TrialState:
    outcome: float | BaseException
    try:
        with heartbeat(storage, trial._trial_id, config.storage.heartbeat_interval):
            outcome = objective(trial, ctx)
    except (Interrupted, KeyboardInterrupt, TloptError) as exc:
        _requeue_and_raise([trial], exc, config)
    except Exception as exc:  # a prune, or a crashed trial: it must not kill the worker
        outcome = exc
    return _settle(study, trial, outcome)


def _run_each(
    study: optuna.Study,
    storage: BaseStorage,
    trials: list[optuna.Trial],
    ctx: StudyContext,
    config: StudyConfig,
) -> list[TrialState]:
    """Run asked trials one after another; if the worker stops, queue the unstarted again."""
    states: list[TrialState] = []
    for i, trial in enumerate(trials):
        try:
            states.append(_run(study, storage, trial, ctx, config))
        except BaseException:
            for waiting in trials[i + 1 :]:
                _fail_and_requeue(study, waiting, "worker stopped", config.storage.max_retry)
            raise
    return states


def _run_heads(
    study: optuna.Study,
    storage: BaseStorage,
    trials: list[optuna.Trial],
    ctx: StudyContext,
    config: StudyConfig,
) -> list[TrialState] | None:
    """Run head trials together; None if their model needs them one at a time."""
    outcomes: list[float | BaseException] | None
    with contextlib.ExitStack() as beats:
        for trial in trials:
            beats.enter_context(
                heartbeat(storage, trial._trial_id, config.storage.heartbeat_interval)
            )
        try:
            outcomes = head_objectives(trials, ctx)
        except (Interrupted, KeyboardInterrupt, TloptError) as exc:
            _requeue_and_raise(trials, exc, config)
        except Exception as exc:  # a crashed batch must not kill the worker
            outcomes = [exc] * len(trials)
    if outcomes is None:
        return None
    return [_settle(study, t, o) for t, o in zip(trials, outcomes, strict=True)]


def _requeue_and_raise(
    trials: list[optuna.Trial], exc: BaseException, config: StudyConfig
) -> NoReturn:
    """The worker stops (a signal) or cannot go on (a TloptError): queue its trials again."""
    stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
    why = "worker stopped" if stopped else str(exc).splitlines()[0][:500]
    for trial in trials:
        _fail_and_requeue(trial.study, trial, why, config.storage.max_retry)
    if stopped:
        raise _Stop("signal") from None
    raise exc


def _settle(study: optuna.Study, trial: optuna.Trial, outcome: float | BaseException) -> TrialState:
    """Tell the study how a trial ended: its value, a prune, or a failure with its reason."""
    if isinstance(outcome, optuna.TrialPruned):
        log.info("trial %d pruned: %s", trial.number, outcome)
        _tell(study, trial, None, TrialState.PRUNED)
        return TrialState.PRUNED
    if isinstance(outcome, BaseException):
        if isinstance(outcome, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            reason = (
                f"CUDA out of memory at batch size {trial.params.get('batch_size')}: lower "
                "search.batch_size or data.image_size, or use fewer --per-gpu"
            )
        else:
            reason = f"{type(outcome).__name__}: {outcome}".splitlines()[0][:500]
        log.error("trial %d failed: %s", trial.number, reason)
        record = functools.partial(trial.set_user_attr, ATTR + "error", reason)
        retrying("recording a failure", record)
        _tell(study, trial, None, TrialState.FAIL)
        return TrialState.FAIL
    _tell(study, trial, outcome, TrialState.COMPLETE)
    log.info(
        "trial %d complete: val_loss %.4f  val_acc %.4f",
        trial.number,
        outcome,
        trial.user_attrs.get("val_accuracy", float("nan")),
    )
    return TrialState.COMPLETE


def _fail_and_requeue(study: optuna.Study, trial: optuna.Trial, why: str, max_retry: int) -> None:
    """Fail an interrupted trial and queue it again with the same parameters."""
    trial.set_user_attr(ATTR + "error", why)
    _tell(study, trial, None, TrialState.FAIL)
    frozen = study._storage.get_trial(trial._trial_id)
    RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)(study, frozen)


def parse_gpus(gpus: str | None) -> list[str]:
    """``"0,1"`` -> ["0", "1"]; ``"all"`` -> every visible CUDA device; None/"" -> []."""
    if not gpus or gpus == "none":
        return []
    if gpus == "all":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise TloptError(
                "--gpus all: no CUDA device is visible; leave out --gpus to use the CPU"
            )
        return [str(i) for i in range(count)]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not all(g.isdigit() for g in ids):
        raise TloptError(f"--gpus '{gpus}' is not a comma-separated list of GPU ids (e.g. 0,1)")
    return ids


def slot_devices(
    gpus: list[str], per_gpu: int, processes: int, visible: str = ""
) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` of each worker slot (None: a CPU slot).

    GPU ids are indices into the devices this process sees, as torch numbers them; under a
    scheduler that already set ``CUDA_VISIBLE_DEVICES`` (Slurm: "2,3"), index 0 is device "2".

    Example:
        >>> slot_devices(["0", "1"], per_gpu=2, processes=1, visible="2,3")
        ['2', '2', '3', '3']
    """
    if not gpus:
        return [None] * processes
    devices = [v.strip() for v in visible.split(",") if v.strip()]
    slots: list[str | None] = []
    for gpu in gpus:
        if devices and int(gpu) >= len(devices):
            raise TloptError(
                f"--gpus {gpu}: only {len(devices)} GPUs are visible (CUDA_VISIBLE_DEVICES="
                f"{visible}); use ids 0..{len(devices) - 1}"
            )
        slots += [devices[int(gpu)] if devices else gpu] * per_gpu
    return slots


def supervise(
    study_name: str,
    storage_url: str | None,
    n_trials: int | None,
    timeout: float | None,
    gpus: list[str],
    per_gpu: int = 1,
    processes: int = 1,
    heads_at_once: int = 1,
    compile: bool = False,
    max_restarts: int = 3,
) -> int:
    """Run one worker process per slot (``per_gpu`` per GPU, or ``processes`` on the CPU).

    ``per_gpu=0`` sizes each GPU's slots from its memory (``--per-gpu auto``, see placement).
    Each slot is pinned with ``CUDA_VISIBLE_DEVICES`` and opens its own storage connection.
    A slot whose process dies is restarted (up to ``max_restarts`` times); SIGINT/SIGTERM are
    passed to every slot, which fail and re-queue their running trials before exiting.
    """
    url = resolve_url(storage_url)
    load(study_name, url)  # fail fast, in one line, on a wrong name or storage
    slots = slot_devices(
        gpus, max(per_gpu, 1), processes, os.environ.get("CUDA_VISIBLE_DEVICES", "")
    )
    if gpus and per_gpu == 0:
        from tlopt.tune.placement import auto_per_gpu

        devices = list(dict.fromkeys(slots))
        slots = [d for d in devices for _ in range(auto_per_gpu(study_name, url, str(d)))]
    # The URL travels in the environment, not argv: `ps` would show its password.
    base = [sys.executable, "-m", "tlopt", "worker", "--study", study_name]
    if n_trials:
        base += ["--n-trials", str(n_trials)]
    if timeout:
        base += ["--timeout", str(timeout)]
    base += ["--heads-at-once", str(heads_at_once)] + (["--compile"] if compile else [])

    def start(gpu: str | None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "TLOPT_STORAGE": url}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
            return subprocess.Popen(base + ["--device", "cuda"], env=env)
        env["CUDA_VISIBLE_DEVICES"] = ""
        return subprocess.Popen(base + ["--device", "cpu"], env=env)

    procs = [start(g) for g in slots]
    restarts = [0] * len(slots)
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    worst = 0
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None or code in (0, 2) or stopping:
                    continue
                if restarts[i] < max_restarts:
                    restarts[i] += 1
                    log.warning("slot %d (gpu %s) died with %d; restarting", i, slots[i], code)
                    procs[i] = start(slots[i])
        for p in procs:
            code = p.returncode or 0
            worst = max(worst, 2 if code == 2 else (1 if code else 0))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return worst
