"""Workers: run a study's trials until it holds its budget of finished trials.

Any number of workers, on any number of machines, share one budget: each one counts the
finished and running trials and asks for a new trial under a lock held in the storage
(``budget_lock``), so the study ends with exactly ``n_trials`` finished (complete or pruned)
trials. A worker whose trial is still running elsewhere waits for it, so a trial failed by the
heartbeat and re-queued is always picked up; every trial has a heartbeat from the moment it
is asked for (see tune/resilience.py), so a dead worker's trial always ends.

One seed, one study: a worker's sampler is seeded from the study's seed, its slot and how
often the supervisor restarted that slot, so a single-worker study proposes the same trials
every time it runs. Each trial's parameters are drawn as soon as it is asked for, and a point
that a running trial already holds is drawn again, so trials that run together (parallel
workers, heads trained at once) differ.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn, cast

import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from tqdm import tqdm

from tlopt.config import SearchSpace, StudyConfig
from tlopt.errors import TloptError
from tlopt.names import ATTR
from tlopt.progress import bar
from tlopt.train.trainer import Interrupted
from tlopt.tune.context import StudyContext, TrialDone
from tlopt.tune.objective import can_batch_heads, head_objectives, objective
from tlopt.tune.pruners import make_pruner
from tlopt.tune.resilience import BEAT, beat_once, fail_stale_trials, heartbeat, retrying
from tlopt.tune.space import space_size, suggest
from tlopt.tune.storage import budget_lock, has_budget_lock, mask_url, open_storage, resolve_url
from tlopt.tune.study import load

log = logging.getLogger("tlopt.worker")
POLL_SECONDS = 2.0
MAX_FAILURES_IN_A_ROW = 3
# The supervisor numbers its worker processes: slot i gets TLOPT_WORKER_SLOT = first + i (first:
# its own TLOPT_WORKER_SLOT, 0 unless set; workers on several machines may set it apart) and
# TLOPT_WORKER_RESTARTS = how often that slot was restarted. A plain worker is slot 0.
SLOT_ENV = "TLOPT_WORKER_SLOT"
RESTARTS_ENV = "TLOPT_WORKER_RESTARTS"
# How often a trial's point is drawn again while a running trial holds the same point.
DRAWS = 20


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
    threads: int | None = None,
    on_trial_done: TrialDone | None = None,
) -> WorkerSummary:
    """Run trials of ``study_name`` in this process until the budget or the timeout is reached.

    ``heads_at_once``: in a head study, ask up to this many trials at a time and train their
    heads together (``head_objectives``); each is still reported, pruned and told on its own.
    ``threads``: torch's CPU threads (default: ``$OMP_NUM_THREADS`` if set, else torch's own).
    ``on_trial_done``: what the interface writes for each finished trial (curves, a note).
    """
    device = check_device(device)
    slot, restarts = worker_slot(), _env_int(RESTARTS_ENV, 0)
    threads = threads or omp_threads(os.environ)
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
        sampler=make_sampler(config.seed, slot, restarts),
        pruner=make_pruner(
            pruner.type, pruner.n_startup_trials, pruner.n_warmup_steps, pruner.options
        ),
    )
    budget = n_trials or config.n_trials
    timeout = timeout if timeout is not None else (config.timeout or None)
    STOP.clear()
    ctx = StudyContext(
        study,
        device,
        progress=True,
        should_stop=STOP.is_set,
        compile=compile,
        on_trial_done=on_trial_done,
    )
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
    shown = bar(total=budget, desc=study_name, unit="trial")
    try:
        while timeout is None or time.monotonic() - began < timeout:
            _show_progress(shown, study)
            if STOP.is_set():
                raise _Stop("signal")
            ask = functools.partial(
                _next_trials,
                study,
                storage,
                study_name,
                budget,
                heads_at_once if batch_heads else 1,
                config.storage.heartbeat_interval,
                functools.partial(_propose, ctx.space, ctx.stage.name),
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


def _next_trials(
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
    parameters, unlike those of every running trial, while the lock keeps others out.
    """
    with budget_lock(storage, study_name):
        fail_stale_trials(study, storage)  # a dead worker's trial is failed and re-queued here
        finished, running = _count(study)
        if finished >= budget:
            return [], True
        taken = {
            _point(t.params) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        }
        trials = []
        for _ in range(min(k, budget - finished - running)):
            trial = study.ask()
            beat_once(storage, trial._trial_id, interval)
            trials.append(propose(trial, taken) if propose else trial)
        if len(trials) > 1:  # the first ones' beats are as old as the proposals of the others
            for trial in trials:
                beat_once(storage, trial._trial_id, interval)
    if not has_budget_lock(storage):
        trials = [t for t in trials if not _over_budget(study, storage, t, budget)]
    return trials, False


def _point(params: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted(params.items()))


class _Draft:
    """Stands in for a trial while ``space.suggest`` draws its point, storing nothing.

    Each value comes from the study's sampler as ``Trial._suggest`` would take it (the
    relative, multivariate proposal on the first draw), so a point can be drawn again before
    it is written when a running trial already holds it.
    """

    def __init__(self, trial: optuna.Trial, frozen: optuna.trial.FrozenTrial, relative: bool):
        self.trial, self.frozen, self.relative = trial, frozen, relative
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return float(self._draw(name, FloatDistribution(low, high, step=step, log=log)))

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._draw(name, CategoricalDistribution(choices))

    def _draw(self, name: str, distribution: BaseDistribution) -> Any:
        trial, study = self.trial, self.trial.study
        if isinstance(distribution, CategoricalDistribution) and len(distribution.choices) == 1:
            value = distribution.choices[0]
        elif isinstance(distribution, FloatDistribution) and distribution.single():
            value = distribution.low
        elif (
            self.relative
            and name in trial.relative_params
            and (trial.relative_search_space or {}).get(name) == distribution
        ):
            value = trial.relative_params[name]
        else:
            value = study.sampler.sample_independent(study, self.frozen, name, distribution)
        self.params[name], self.distributions[name] = value, distribution
        return value


def _propose(
    space: SearchSpace, stage: str, trial: optuna.Trial, taken: set[tuple[Any, ...]]
) -> optuna.Trial:
    """Draw and store the parameters of a new trial: a point no running trial holds.

    A trial that was queued (a retry, an enqueued point) keeps its own. Parallel workers and
    heads trained together would otherwise run the same point at the same time: TPE's
    constant liar makes that unlikely once it models the study, but its random start-up
    trials in a small space repeat often. In a space that running trials use up, or after
    ``DRAWS`` draws, the point drawn last is kept.
    """
    frozen = trial.storage.get_trial(trial._trial_id)
    if frozen.params or "fixed_params" in frozen.system_attrs:
        taken.add(_point(frozen.params or frozen.system_attrs["fixed_params"]))
        return trial
    size = space_size(space)
    draws = 1 if size is not None and len(taken) >= size else DRAWS
    for draw in range(draws):
        draft = _Draft(trial, frozen, relative=draw == 0)
        suggest(cast(optuna.Trial, draft), space, stage)
        if _point(draft.params) not in taken:
            break
    else:
        log.debug("trial %d repeats the point of a running trial", trial.number)
    taken.add(_point(draft.params))
    for name, value in draft.params.items():
        distribution = draft.distributions[name]
        trial.storage.set_trial_param(
            trial._trial_id, name, distribution.to_internal_repr(value), distribution
        )
    # A fresh view of the trial, which sees the parameters just stored.
    return optuna.Trial(study=trial.study, trial_id=trial._trial_id)


def _count(study: optuna.Study, before: int | None = None) -> tuple[int, int]:
    """(finished trials, running trials numbered below ``before``, or all running)."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    running = sum(
        t.state == TrialState.RUNNING and (before is None or t.number < before) for t in trials
    )
    return finished, running


# System attributes of a trial that was queued rather than sampled: a point enqueued by hand
# or by tlopt (fixed_params), a retry of a trial whose worker died (Optuna's
# RetryHeartbeatStaleTrialCallback writes failed_trial and retry_history).
QUEUED = ("fixed_params", "failed_trial", "retry_history")


def _over_budget(
    study: optuna.Study, storage: BaseStorage, trial: optuna.Trial, budget: int
) -> bool:
    """Without a budget lock (behind the gRPC proxy): whether another worker got the last place.

    Trials are numbered in creation order, so the running trials numbered below this one came
    first: this one runs only if the finished trials and those leave room for it. A trial that
    does not is ended FAIL with the reason and never run; one that was queued (a retry, an
    enqueued point) is queued again with its parameters, its checkpoint and its retry history.
    """
    finished, ahead = _count(study, before=trial.number)
    if finished + ahead < budget:
        return False
    frozen = storage.get_trial(trial._trial_id)
    trial.set_user_attr(ATTR + "error", "over budget: another worker took the last trial")
    _tell(study, trial, None, TrialState.FAIL)
    if any(key in frozen.system_attrs for key in QUEUED):
        _queue_again(study, frozen)
    return True


def _queue_again(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
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


def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None, state: TrialState) -> None:
    def tell() -> None:
        # UpdateFinishedTrialError: an earlier attempt committed before the connection dropped.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study.tell(trial, value, state=state)

    retrying(f"recording trial {trial.number}", tell)


def _run(
    study: optuna.Study,
    trial: optuna.Trial,
    ctx: StudyContext,
    config: StudyConfig,
    beat: contextlib.ExitStack,
) -> TrialState:
    """Run one trial while it beats (``beat`` stops its heartbeat), then tell how it ended."""
    outcome: float | BaseException
    try:
        with beat:
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
    """Run asked trials one after another; if the worker stops, queue the unstarted again.

    Every trial beats from the start, the waiting ones too: they are RUNNING, and a trial
    without beats is failed after the grace period.
    """
    states: list[TrialState] = []
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
    """Run head trials together; None if their model needs them one at a time.

    Each trial is told as soon as it ends (a 10-epoch trial does not wait for a 50-epoch one).
    """
    states: dict[int, TrialState] = {}

    def tell(i: int, outcome: float | BaseException) -> None:
        states[i] = _settle(study, trials[i], outcome)

    with contextlib.ExitStack() as beats:
        for trial in trials:
            beats.enter_context(
                heartbeat(storage, trial._trial_id, config.storage.heartbeat_interval)
            )
        try:
            if head_objectives(trials, ctx, on_outcome=tell) is None:
                return None
        except (Interrupted, KeyboardInterrupt, TloptError) as exc:
            _requeue_and_raise([t for i, t in enumerate(trials) if i not in states], exc, config)
        except Exception as exc:  # a crashed batch must not kill the worker
            for i in range(len(trials)):
                if i not in states:
                    tell(i, exc)
    return [states[i] for i in range(len(trials))]


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
        # Failed already: the stale check of another worker judged its heartbeat too old.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise TloptError(f"{name}={value!r} is not a whole number >= 0: unset it or fix it")
    return int(value)


def worker_slot() -> int:
    """This worker's slot (``$TLOPT_WORKER_SLOT``, set by the supervisor; 0 by default)."""
    return _env_int(SLOT_ENV, 0)


def sampler_seed(seed: int, slot: int = 0, restarts: int = 0) -> int:
    """The sampler seed of a worker: one per study seed, slot and restart of that slot.

    Not the process id: containers give every worker the same one, and a study run by one
    worker would propose other trials each time. A restarted slot does not replay the trials
    its first process proposed.

    Example:
        >>> sampler_seed(0) == sampler_seed(0) != sampler_seed(0, slot=1) != sampler_seed(0, 0, 1)
        True
    """
    digest = hashlib.sha256(f"tlopt-sampler:{seed}:{slot}:{restarts}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(seed: int, slot: int = 0, restarts: int = 0) -> optuna.samplers.TPESampler:
    """The TPE sampler of a worker, its options set rather than left to Optuna's defaults.

    Optuna 5.0 turned both on by default (4.x: both off), and the defaults may move again:
    - ``constant_liar``: the running trials count as bad ones, so parallel workers and heads
      trained together are not proposed the points the others are running;
    - ``multivariate`` with ``group``: batch size, epochs and learning rate act together, so
      they are modelled jointly; ``group`` keeps the decay's own parameters (present only
      for their decay) in the joint model instead of sampling them independently.
    """
    return optuna.samplers.TPESampler(
        seed=sampler_seed(seed, slot, restarts),
        constant_liar=True,
        multivariate=True,
        group=True,
    )


def omp_threads(env: Mapping[str, str]) -> int | None:
    """The thread count ``$OMP_NUM_THREADS`` asks for (its first level), if it is valid."""
    first = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as a cgroup cpuset sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def slot_threads(slots: int, threads: int | None, env: Mapping[str, str], cores: int) -> int:
    """CPU threads per worker process: ``--threads``, else ``$OMP_NUM_THREADS``, else a share.

    As torchrun does, each of ``slots`` processes gets ``cores // slots`` threads (at least
    one): each with torch's default pool of every core, N processes on N cores ran one epoch
    ten times slower than one process alone.

    Example:
        >>> slot_threads(3, None, {}, cores=16), slot_threads(4, None, {"OMP_NUM_THREADS": "2"}, 4)
        (5, 2)
    """
    return threads or omp_threads(env) or max(1, cores // max(slots, 1))


def slot_env(
    env: Mapping[str, str],
    url: str,
    gpu: str | None,
    slot: int,
    restarts: int,
    threads: int,
) -> dict[str, str]:
    """The environment of one worker process started by the supervisor.

    The storage URL travels here, not in argv: ``ps`` would show its password.
    """
    return {
        **env,
        "TLOPT_STORAGE": url,
        "CUDA_VISIBLE_DEVICES": gpu if gpu is not None else "",
        SLOT_ENV: str(slot),
        RESTARTS_ENV: str(restarts),
        "OMP_NUM_THREADS": str(threads),
    }


def check_device(device: str | None) -> str | None:
    """``--device`` as torch names it ("gpu" is "cuda"), or a one-line TloptError.

    Example:
        >>> check_device("cpu"), check_device(None), check_device("auto")
        ('cpu', None, 'auto')
    """
    if device in (None, "", "auto"):
        return device
    assert device is not None
    name = device.strip().lower()
    if name == "gpu" or name.startswith("gpu:"):
        name = "cuda" + name[3:]
    try:
        parsed = torch.device(name)
    except RuntimeError:
        raise TloptError(
            f"--device {device}: unknown device; use cpu, cuda, cuda:N or auto"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            raise TloptError(
                f"--device {device}: no CUDA device is visible{where}; use --device cpu, or "
                "--device auto to take a GPU when there is one"
            )
        if parsed.index is not None and parsed.index >= count:
            raise TloptError(
                f"--device {device}: only {count} CUDA devices are visible; use cuda:0.."
                f"cuda:{count - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise TloptError(f"--device {device}: MPS is not available here; use --device cpu")
    return name


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
    threads: int | None = None,
) -> int:
    """Run one worker process per slot (``per_gpu`` per GPU, or ``processes`` on the CPU).

    ``per_gpu=0`` sizes each GPU's slots from its memory (``--per-gpu auto``, see placement).
    Each slot is pinned with ``CUDA_VISIBLE_DEVICES``, gets its share of the CPU cores
    (``slot_threads``) and its number (``slot_env``), and opens its own storage connection.
    A slot whose process dies is restarted (up to ``max_restarts`` times) with its number;
    SIGINT/SIGTERM are passed to every slot, which fail and re-queue their running trials
    before exiting.
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
    first = worker_slot()
    per_slot = slot_threads(len(slots), threads, os.environ, available_cores())
    log.info("%d worker processes with %d CPU threads each", len(slots), per_slot)
    base = [sys.executable, "-m", "tlopt", "worker", "--study", study_name]
    if n_trials:
        base += ["--n-trials", str(n_trials)]
    if timeout:
        base += ["--timeout", str(timeout)]
    base += ["--heads-at-once", str(heads_at_once)] + (["--compile"] if compile else [])

    restarts = [0] * len(slots)

    def start(i: int) -> subprocess.Popen[bytes]:
        gpu = slots[i]
        env = slot_env(os.environ, url, gpu, first + i, restarts[i], per_slot)
        return subprocess.Popen(base + ["--device", "cpu" if gpu is None else "cuda"], env=env)

    procs = [start(i) for i in range(len(slots))]
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
                    procs[i] = start(i)
        for p in procs:
            code = p.returncode or 0
            worst = max(worst, 2 if code == 2 else (1 if code else 0))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return worst
