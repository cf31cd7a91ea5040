"""Study storage: SQLite for one machine, PostgreSQL for many; artifacts beside them.

Heartbeats and retries are on by default: a trial whose worker dies is failed after the grace
period and re-queued with the same parameters (Optuna's ``RetryFailedTrialCallback``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from tlopt.errors import StorageError

DEFAULT_URL = "sqlite:///studies/tlopt.db"

# tlopt runs its own ask/tell loop with Optuna's heartbeat thread (it needs the budget lock
# around `ask`), which these notices warn about; the features are the ones Optuna documents.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
_PASSWORD = re.compile(r"(?<=://)([^:/@]+):([^@]*)@")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for every output and log)."""
    return _PASSWORD.sub(r"\1:***@", url)


def resolve_url(url: str | None = None, config_url: str = "") -> str:
    """``--storage`` over ``TLOPT_STORAGE`` over the study file over the default SQLite file."""
    url = url or os.environ.get("TLOPT_STORAGE") or config_url or DEFAULT_URL
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = Path(url[len("sqlite:///") :]).expanduser().resolve()
        url = f"sqlite:///{path}"
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def open_storage(
    url: str, heartbeat_interval: int = 30, grace_period: int = 90, max_retry: int = 3
) -> RDBStorage:
    """An RDB storage with heartbeats, retries and connection health checks.

    Raises:
        StorageError: the database cannot be reached or opened (the message hides passwords).
    """
    engine_kwargs: dict[str, object] = {}
    path = sqlite_path(url)
    if path is not None:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        _sqlite_wal(path)
        # Several local workers write the same file: wait for the lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        # A restarted server leaves dead pooled connections; test each before use.
        engine_kwargs["pool_pre_ping"] = True
    try:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                max_retry=max_retry, inherit_intermediate_values=True
            ),
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        first = reason[0] if reason else type(exc).__name__
        raise StorageError(
            f"cannot open storage {mask_url(url)}: {mask_url(first)[:200]}; check the URL, "
            "that the server runs and the database exists"
        ) from None


def _sqlite_wal(path: Path) -> None:
    # WAL lets readers (the dashboard, 'study show') work while workers write.
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise StorageError(
            f"cannot open SQLite file '{path}': {exc}; check the path and its permissions"
        ) from None


def default_artifact_dir(url: str) -> Path:
    """Artifacts live beside a SQLite file; for a server, under ./studies/artifacts."""
    path = sqlite_path(url)
    return (path.parent if path else Path("studies")).resolve() / "artifacts"


def artifact_store(path: str | Path) -> FileSystemArtifactStore:
    Path(path).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


@contextlib.contextmanager
def budget_lock(storage: RDBStorage, study_name: str) -> Iterator[None]:
    """Serialise "count the trials, then ask for one" across all workers of a study.

    PostgreSQL: a session advisory lock on the server, so workers on any machine agree.
    SQLite: an ``flock`` on a file beside the database (one machine, by construction).
    """
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    url = str(storage.engine.url)
    path = sqlite_path(url)
    if path is not None:
        with open(f"{path}.{key & 0xFFFF:04x}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if storage.engine.dialect.name != "postgresql":
        yield
        return
    with storage.engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            connection.commit()


def study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage)]
