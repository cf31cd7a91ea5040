"""Surviving a storage that goes away for a while, and workers that die.

Optuna's RDB storage raises on the first failed statement, and its heartbeat thread dies on
the first failed heartbeat. tlopt retries storage calls with backoff for a while, and beats
with a thread that survives failed beats, so a database restart costs a pause, not a worker.

No trial is RUNNING without a heartbeat: a worker records one as soon as it asks for a trial
(``beat_once``), and the stale check gives one to any RUNNING trial that has none
(``fail_stale_trials``), so a worker that dies between ``ask`` and its first beat (a segfault,
the OOM killer while the model is built) leaves a trial that is failed and re-queued too.

After an outage every worker's beats are old at once. Live workers beat again within a second
of the storage coming back (a missed beat is retried every second, not every interval), and
no process judges other trials stale until it has itself been connected for a grace period
(``connected_for``): the first worker to reconnect never fails the trials of the others.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import optuna
import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.storages import BaseStorage, RDBStorage

# Optuna exports no name for the heartbeat interface of a storage; RDBStorage implements it.
from optuna.storages._heartbeat import BaseHeartbeat

from tlopt.errors import StorageError

log = logging.getLogger("tlopt.worker")
T = TypeVar("T")
BEAT = "tlopt:beat"  # the beat of a worker behind `tlopt storage proxy` (see tune/proxy.py)

try:  # workers behind `tlopt storage proxy` see the proxy's errors as grpc.RpcError
    import grpc

    _GRPC: tuple[type[BaseException], ...] = (grpc.RpcError,)
except ImportError:
    _GRPC = ()
TRANSIENT: tuple[type[BaseException], ...] = (
    StorageInternalError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    *_GRPC,
)
# How long a worker keeps retrying before it gives up with a StorageError (seconds).
PATIENCE_SECONDS = 600.0
# How soon a missed heartbeat is tried again (seconds): live workers must beat within a second
# or two of the storage coming back, before anyone judges their trials stale.
BEAT_RETRY_SECONDS = 1.0


class _Reachability:
    """Since when this process has reached the storage without a failure (its start counts).

    Measured from the first success after the last failure, not from the failure: the storage
    was down then, and may have come back only just before that success.
    """

    def __init__(self) -> None:
        self.since: float | None = time.monotonic()

    def lost(self) -> None:
        self.since = None

    def reached(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def connected_for(self) -> float:
        """Seconds this process has reached the storage since its last failed call."""
        return 0.0 if self.since is None else time.monotonic() - self.since


REACHABILITY = _Reachability()


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    return (text[0] if text else type(cause).__name__)[:160]


# Words in the driver's message of errors that pass: the server restarts, the network drops,
# another writer holds the lock. Anything else (a read-only file, a wrong password, a missing
# database, a full disk) will not pass by waiting, and is reported at once.
_PASSING = (
    "connection",
    "connect to server",
    "server closed",
    "terminating",
    "shutting down",
    "starting up",
    "database is locked",
    "timeout",
    "timed out",
    "ssl syscall",
    "broken pipe",
    "recovery mode",
    "could not receive",
    "could not send",
    "no route to host",
)


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying (see ``_PASSING``)."""
    if not isinstance(exc, TRANSIENT):
        return False
    if _GRPC and isinstance(exc, _GRPC):  # the proxy restarts or the network drops
        code = getattr(exc, "code", None)
        passing = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return callable(code) and code() in passing
    text = f"{exc} {exc.__cause__ or ''} {getattr(exc.__cause__, 'orig', '')}".lower()
    if any(
        word in text
        for word in (
            "readonly",
            "read-only",
            "authentication",
            "password",
            "does not exist",
            "permission denied",
            "disk",
        )
    ):
        return False
    return any(word in text for word in _PASSING)


def retrying(what: str, fn: Callable[[], T], patience: float = PATIENCE_SECONDS) -> T:
    """Call ``fn``, retrying with backoff while the storage is unreachable.

    Raises:
        StorageError: a storage error that waiting does not cure, or one that outlasted
            ``patience`` seconds.
    """
    began, delay = time.monotonic(), 0.5
    while True:
        try:
            result = fn()
            REACHABILITY.reached()
            return result
        except TRANSIENT as exc:
            if not is_transient(exc):
                raise StorageError(
                    f"the storage refused {what}: {_reason(exc)}; check the database "
                    "(permissions, free disk space, credentials)"
                ) from None
            if "database is locked" not in str(exc).lower():  # SQLite's writers: no outage
                REACHABILITY.lost()
            if time.monotonic() - began > patience:
                raise StorageError(
                    f"the storage was unreachable for {patience:.0f} s while {what} "
                    f"({_reason(exc)}): check the database server, then restart the worker"
                ) from None
            log.warning(
                "storage unreachable while %s (%s); retrying in %.1f s", what, _reason(exc), delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


@contextlib.contextmanager
def heartbeat(storage: BaseStorage, trial_id: int, interval: int | None) -> Iterator[None]:
    """Record the trial's heartbeat every interval until the block ends; failed beats retry.

    Behind ``tlopt storage proxy`` (no heartbeat API) the beat is a counter in the trial's
    system attribute ``tlopt:beat``, which the proxy turns into a heartbeat.
    """
    if isinstance(storage, BaseHeartbeat):
        interval = storage.get_heartbeat_interval()
    if interval is None:
        yield
        return
    stop = threading.Event()
    beats = itertools.count()

    def record() -> None:
        if isinstance(storage, BaseHeartbeat):
            storage.record_heartbeat(trial_id)
        else:
            storage.set_trial_system_attr(trial_id, BEAT, next(beats))

    def beat() -> None:
        missed = 0
        while not stop.is_set():
            try:
                record()
                REACHABILITY.reached()
                if missed:
                    log.warning("heartbeat of trial id %d back after %d missed", trial_id, missed)
                missed = 0
            except TRANSIENT as exc:
                REACHABILITY.lost()
                if not missed:
                    log.warning("heartbeat of trial id %d missed (%s)", trial_id, _reason(exc))
                missed += 1
            except Exception as exc:  # never let the beat thread die noisily
                log.warning("heartbeat of trial id %d failed (%s)", trial_id, exc)
                missed += 1
            # After a miss, try again within a second: the storage may be back, and the beat
            # must land before another process judges this trial stale.
            stop.wait(min(BEAT_RETRY_SECONDS, interval) if missed else interval)

    thread = threading.Thread(target=beat, name=f"tlopt-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def beat_once(storage: BaseStorage, trial_id: int, interval: int | None) -> None:
    """One heartbeat of a trial, as soon as it is asked for, before anything else can fail.

    Optuna fails only the stale trials that have a heartbeat, so a trial must have one from
    the moment it is RUNNING. Behind ``tlopt storage proxy`` it is a new value of the
    ``tlopt:beat`` attribute, which the proxy turns into a heartbeat.
    """
    if isinstance(storage, BaseHeartbeat):
        if storage.get_heartbeat_interval() is not None:
            storage.record_heartbeat(trial_id)
    elif interval is not None:
        # Negative: never one of the beat thread's counts (0, 1, ...), and new each time.
        storage.set_trial_system_attr(trial_id, BEAT, -time.time())


# RUNNING trials without a heartbeat row. Optuna has no API for this; the tables are those of
# its RDB schema (``trial_heartbeats`` since Optuna 2.9).
_UNBEATEN = sqlalchemy.text(
    "SELECT t.trial_id, t.number FROM trials t WHERE t.study_id = :study AND "
    "t.state = 'RUNNING' AND NOT EXISTS "
    "(SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id) ORDER BY t.number"
)


def unbeaten_trials(storage: RDBStorage, study_id: int) -> list[tuple[int, int]]:
    """(trial id, number) of the study's RUNNING trials that have no heartbeat."""
    with storage.engine.connect() as connection:
        return [(int(i), int(n)) for i, n in connection.execute(_UNBEATEN, {"study": study_id})]


def grace_seconds(storage: RDBStorage) -> float:
    """The storage's grace period (Optuna's default: two heartbeat intervals)."""
    interval = storage.get_heartbeat_interval() or 0
    return float(storage.grace_period or 2 * interval)


def fail_stale_trials(study: optuna.Study, storage: BaseStorage) -> None:
    """Fail the study's stale trials and re-queue them (the storage's stale-trial callback).

    Only once this process has been connected for a grace period: after an outage the other
    workers' beats are old too, and they need that long to beat again (see the module's note).

    Optuna's ``fail_stale_trials`` skips a RUNNING trial that has no heartbeat at all: a
    worker that died before its first beat would leave it RUNNING for ever, and the workers
    that wait for the running trials would wait for ever too. Such a trial gets a heartbeat
    here, so it is failed one grace period later unless its worker beats after all. Its age
    is judged by the database's clock, never by ``datetime_start``, which is the local time
    of the machine that asked for it (another time zone, another clock).
    """
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        return
    if REACHABILITY.connected_for() < grace_seconds(storage):
        log.debug("stale-trial check deferred: connected for less than a grace period")
        return
    for trial_id, number in unbeaten_trials(
        storage, storage.get_study_id_from_name(study.study_name)
    ):
        log.warning(
            "trial %d is running without a heartbeat (did its worker die before its "
            "first beat?): it fails after the grace period unless it beats",
            number,
        )
        storage.record_heartbeat(trial_id)
    optuna.storages.fail_stale_trials(study)
