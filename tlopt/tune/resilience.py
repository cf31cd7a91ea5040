"""Surviving a storage that goes away for a while (a PostgreSQL restart, a network blip).

Optuna's RDB storage raises on the first failed statement, and its heartbeat thread dies on
the first failed heartbeat. tlopt retries storage calls with backoff for a while, and beats
with a thread that survives failed beats, so a database restart costs a pause, not a worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage

from tlopt.errors import StorageError

log = logging.getLogger("tlopt.worker")
T = TypeVar("T")

TRANSIENT = (StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
# How long a worker keeps retrying before it gives up with a StorageError (seconds).
PATIENCE_SECONDS = 600.0


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    return (text[0] if text else type(cause).__name__)[:160]


def retrying(what: str, fn: Callable[[], T], patience: float = PATIENCE_SECONDS) -> T:
    """Call ``fn``, retrying with backoff while the storage is unreachable."""
    began, delay = time.monotonic(), 0.5
    while True:
        try:
            return fn()
        except TRANSIENT as exc:
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
def heartbeat(storage: RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval until the block ends; failed beats retry."""
    interval = storage.get_heartbeat_interval()
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                storage.record_heartbeat(trial_id)
            except TRANSIENT as exc:
                log.warning("heartbeat of trial id %d missed (%s)", trial_id, _reason(exc))
            except Exception as exc:  # never let the beat thread die noisily
                log.warning("heartbeat of trial id %d failed (%s)", trial_id, exc)
            stop.wait(interval)

    thread = threading.Thread(target=beat, name=f"tlopt-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
