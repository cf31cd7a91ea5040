"""``tlopt storage proxy``: Optuna's gRPC storage proxy in front of PostgreSQL, with heartbeats.

With hundreds of workers, each holding its own pool of database connections, the database
runs out of connections before the GPUs run out of work. Optuna's ``run_grpc_proxy_server``
serves the storage API to any number of ``GrpcStorageProxy`` clients over one pool. Two things
do not cross it, and tlopt adds them:

- **Heartbeats.** A client cannot record one. A worker behind the proxy bumps the trial's
  system attribute ``tlopt:beat`` instead; the proxy turns every change into an RDB heartbeat
  and fails stale trials itself (re-queued by Optuna's ``RetryHeartbeatStaleTrialCallback``).
  Staleness is judged by the database's clock, so the workers' clocks do not matter. Only
  tlopt's studies are watched, each with its own grace period (``storage.grace_period`` of
  its config): other studies in the same database are never touched. After an outage of the
  database the proxy fails nothing until it has been connected for that grace period, so
  that the workers behind it can beat again first.
- **The budget lock.** A client cannot take the server's advisory lock, so the worker asks
  first and checks its place after (``over_budget``): the study still ends with exactly its
  budget; a trial that lost a race for the last place ends FAIL with a reason, and is not run.

Workers use ``--storage grpc://HOST:PORT``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, fail_stale_trials
from optuna.trial import TrialState

from tlopt.config import StorageConfig
from tlopt.errors import StorageError
from tlopt.names import ATTR
from tlopt.tune.resilience import BEAT, REACHABILITY, TRANSIENT, _reason

log = logging.getLogger("tlopt.proxy")
SCHEME = "grpc://"
DEFAULT_PORT = 13000


def is_grpc(url: str) -> bool:
    return url.startswith(SCHEME)


def parse_url(url: str) -> tuple[str, int]:
    """``grpc://HOST[:PORT]`` as (host, port); StorageError in one line if malformed."""
    rest = url[len(SCHEME) :].rstrip("/")
    host, _, port = rest.rpartition(":") if ":" in rest.strip("[]") else (rest, "", "")
    host = host.strip("[]")
    if not host or (port and not port.isdigit()) or not 0 < int(port or DEFAULT_PORT) < 65536:
        raise StorageError(f"storage {url!r} is not grpc://HOST:PORT (e.g. grpc://db-proxy:13000)")
    return host, int(port or DEFAULT_PORT)


def open_proxy(url: str, timeout: float = 10.0) -> BaseStorage:
    """A ``GrpcStorageProxy`` for ``url``, once its server answers; else one-line StorageError."""
    host, port = parse_url(url)
    try:
        import grpc
        from optuna.storages import GrpcStorageProxy
    except ImportError:
        raise StorageError(f"storage {url} needs grpcio: pip install 'tlopt[proxy]'") from None
    proxy = GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=timeout)
    except (grpc.FutureTimeoutError, ConnectionError):
        proxy.close()
        raise StorageError(
            f"no storage proxy answers at {url} within {timeout:.0f} s: start one with "
            f"'tlopt storage proxy --storage postgresql://... --port {port}' on {host}"
        ) from None
    return proxy


class StaleTrialWatcher:
    """In the proxy: turns workers' beats into heartbeats and fails trials whose beats stop.

    ``grace``: seconds without a beat before a trial fails, for every study; None (the
    default) takes each study's own ``storage.grace_period``.
    """

    def __init__(self, storage: RDBStorage, grace: float | None = None) -> None:
        self.storage, self.grace = storage, grace
        self.every = 1.0  # the next pass, a third of the shortest grace period seen
        self.seen: dict[int, Any] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tlopt-stale-trials", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.sweep()
                REACHABILITY.reached()
            except TRANSIENT as exc:
                REACHABILITY.lost()
                log.warning(
                    "stale-trial check skipped (%s); next in %.0f s", _reason(exc), self.every
                )
            except Exception as exc:  # never let the watcher die: log and go on
                log.warning("stale-trial check failed (%s)", exc)
            self.stop.wait(self.every)

    def grace_of(self, study: Any) -> float | None:  # a FrozenStudy (get_all_studies)
        """The study's grace period; None for a study that is not tlopt's (left alone)."""
        config = study.user_attrs.get(ATTR + "config")
        if not isinstance(config, dict):
            return None
        if self.grace is not None:
            return self.grace
        stored = (config.get("storage") or {}).get("grace_period")
        return float(stored if stored is not None else StorageConfig.grace_period)

    def sweep(self) -> None:
        """One pass over tlopt's studies: record the beats seen since the last pass, fail the
        stale (once the proxy has been connected for the study's grace period)."""
        running: set[int] = set()
        graces = []
        for frozen in self.storage.get_all_studies():
            grace = self.grace_of(frozen)
            if grace is None:
                continue
            graces.append(grace)
            for trial in self.storage.get_all_trials(
                frozen._study_id, deepcopy=False, states=(TrialState.RUNNING,)
            ):
                running.add(trial._trial_id)
                beat = trial.system_attrs.get(BEAT)
                # A trial seen for the first time gets a heartbeat, beat or not: one whose
                # worker died before its first beat is then failed after the grace period.
                if trial._trial_id not in self.seen or self.seen[trial._trial_id] != beat:
                    self.storage.record_heartbeat(trial._trial_id)
                    self.seen[trial._trial_id] = beat
            if REACHABILITY.connected_for() < grace:
                continue  # after an outage, the workers beat again first
            # Optuna judges staleness by the storage's grace period and has no per-study one:
            # this thread is the proxy's only caller of fail_stale_trials.
            self.storage.grace_period = int(grace)
            study = optuna.Study(study_name=frozen.study_name, storage=self.storage)
            fail_stale_trials(study)  # fails and re-queues through the storage's callback
        self.seen = {k: v for k, v in self.seen.items() if k in running}
        self.every = max(1.0, min(graces, default=3.0) / 3)


def serve(
    storage: RDBStorage, url_shown: str, host: str, port: int, grace: float | None = None
) -> None:
    """Serve ``storage`` on host:port until interrupted; a busy port is a one-line error.

    ``grace``: see :class:`StaleTrialWatcher` (None: each study's own).
    """
    from optuna.storages import get_storage, run_grpc_proxy_server

    watcher = StaleTrialWatcher(storage, grace)
    watcher.start()
    log.info(
        "storage proxy for %s on %s:%d: workers use --storage grpc://%s:%d (Ctrl-C stops it)",
        url_shown,
        host,
        port,
        host if host not in ("0.0.0.0", "::") else "THIS-HOST",
        port,
    )
    try:
        # The cached storage in front of the RDB one, as Optuna's documentation advises.
        run_grpc_proxy_server(get_storage(storage), host=host, port=port)
    except RuntimeError as exc:  # grpc: "Failed to bind to address"
        raise StorageError(
            f"cannot listen on {host}:{port} ({str(exc).splitlines()[0][:120]}): pass --port "
            "with a free port, or --host with an address of this machine"
        ) from None
    finally:
        watcher.close()
