"""Study storage: SQLite for one machine, PostgreSQL for many (artifacts: ``artifacts.py``).

Heartbeats and retries are on by default: a trial whose worker dies is failed after the grace
period and re-queued with the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``).
A trial beats from the moment it is asked for (see tune/resilience.py).
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
from urllib.parse import unquote

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback

from tlopt.errors import StorageError
from tlopt.tune.proxy import is_grpc, open_proxy

DEFAULT_URL = "sqlite:///studies/tlopt.db"

# tlopt runs its own ask/tell loop with Optuna's heartbeat thread (it needs the budget lock
# around `ask`), which these notices warn about; the features are the ones Optuna documents.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
# user:password@ after the scheme. The password runs to the *last* '@': users paste passwords
# with '@' or '/' in them unencoded, and masking too much is harmless where too little is not.
_PASSWORD = re.compile(r"(?<=://)([^:/@]*):(.*)@")
# A query parameter that holds a secret: libpq's password and sslpassword, MySQL's passwd, and
# any token or secret a driver takes. Its value runs to the next '&', ';' or '#'.
_SECRET_KEY = re.compile(r"pass(word|wd)|pwd|secret|token", re.IGNORECASE)
_PARAM = re.compile(r"([?&;]([^=&;#?]*)=)([^&;#]*)")


def mask_url(url: str) -> str:
    """The URL with every secret in it replaced by ``***`` (for every output, log and file).

    Secrets are the password of ``user:password@`` and the value of each query parameter
    named like one (``?password=``, ``sslpassword=``, ``token=``, ...).

    Example:
        >>> mask_url("postgresql://me:p@ss/word@db.example:5432/tlopt")
        'postgresql://me:***@db.example:5432/tlopt'
        >>> mask_url("postgresql://me@db/tlopt?sslmode=require&sslpassword=k3y")
        'postgresql://me@db/tlopt?sslmode=require&sslpassword=***'
    """

    def hide(param: re.Match[str]) -> str:
        return param.group(1) + "***" if _SECRET_KEY.search(param.group(2)) else param.group(0)

    # The query first: its masked values hold no '@' for the password's match to run to.
    return _PASSWORD.sub(r"\1:***@", _PARAM.sub(hide, url))


def has_secret(url: str) -> bool:
    """Whether ``url`` holds a secret that :func:`mask_url` hides."""
    return mask_url(url) != url


def _secrets(url: str) -> set[str]:
    """Every secret in ``url``, as written and as the driver reads it (percent-decoded)."""
    found = set()
    userinfo = _PASSWORD.search(_PARAM.sub(lambda m: m.group(1), url))
    if userinfo and userinfo.group(2):
        found.add(userinfo.group(2))
    found |= {m.group(3) for m in _PARAM.finditer(url) if _SECRET_KEY.search(m.group(2))}
    with contextlib.suppress(Exception):  # SQLAlchemy's reading of the URL, where it has one
        parsed = sqlalchemy.engine.make_url(url)
        found.add(str(parsed.password or ""))
        for key, value in parsed.query.items():
            if _SECRET_KEY.search(key):
                found |= {value} if isinstance(value, str) else set(value)
    found |= {unquote(s) for s in found}
    return {s for s in found if s}


def _scrub(text: str, url: str) -> str:
    """``text`` (a driver's message about ``url``) without any piece of the URL's secrets.

    An unencoded '@' or '/' in a password makes the driver read part of it as the host
    ("failed to resolve host 'ret@db'"), so the pieces are hidden too, not only the whole.
    """
    text = mask_url(text)
    secrets = _secrets(url)
    pieces = {p for s in secrets for p in re.split(r"[@/:?#]", s)}
    for piece in sorted(secrets | pieces, key=len, reverse=True):
        if len(piece) >= 2:
            text = text.replace(piece, "***")
    return text


def resolve_url(url: str | None = None, config_url: str = "") -> str:
    """``--storage`` over ``TLOPT_STORAGE`` over the study file over the default SQLite file."""
    url = url or os.environ.get("TLOPT_STORAGE") or config_url or DEFAULT_URL
    if "\x00" in url:
        raise StorageError(f"storage URL {mask_url(url)!r} contains a NUL character")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        try:
            path = Path(url[len("sqlite:///") :]).expanduser().resolve()
        except RuntimeError:  # '~someone/...' for a user this machine does not know
            raise StorageError(f"storage {url}: cannot expand '~' (no such user)") from None
        url = f"sqlite:///{path}"
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def open_storage(
    url: str,
    heartbeat_interval: int = 30,
    grace_period: int = 90,
    max_retry: int = 3,
    writable: bool = True,
) -> BaseStorage:
    """An RDB storage with heartbeats, retries and connection health checks.

    ``grpc://HOST:PORT`` gives a client of ``tlopt storage proxy`` instead (see tune/proxy.py).

    ``writable=False`` is for commands that only read (list, show, export): they work on a
    SQLite file the user may not write.

    Raises:
        StorageError: the database cannot be reached or opened, or (``writable``) a SQLite
            file or its folder is read-only (the message hides passwords).
    """
    if is_grpc(url):  # `tlopt storage proxy`: heartbeats and retries are the proxy's
        return open_proxy(url)
    engine_kwargs: dict[str, object] = {}
    path = sqlite_path(url)
    if path is not None:
        _sqlite_folder(path)
        if writable:
            check_writable_sqlite(path)
        _sqlite_wal(path)
        # Several local workers write the same file: wait for the lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        # A restarted server leaves dead pooled connections; test each before use.
        engine_kwargs["pool_pre_ping"] = True
        if url.startswith("postgresql"):
            engine_kwargs["connect_args"] = _pg_connect_args(url)
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
        found = _PASSWORD.search(url)
        encode = (
            " (write '@', '/', ':' in a password as %40, %2F, %3A)"
            if found and re.search(r"[@/:]", found.group(2))
            else ""
        )
        raise StorageError(
            f"cannot open storage {mask_url(url)}: {_scrub(first, url)[:200]}; check the URL"
            f"{encode}, that the server runs and the database exists"
        ) from None


# A peer cut off by the network is noticed within about a minute, on both sides: the client
# by libpq's keepalives, the server (which then ends the session and frees its budget lock)
# by its own, set for this session. Without them TCP gives up after hours.
KEEPALIVE = {"keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def _pg_connect_args(url: str) -> dict[str, object]:
    args: dict[str, object] = {"keepalives": 1, **KEEPALIVE, "connect_timeout": 10}
    if "options" not in sqlalchemy.engine.make_url(url).query:  # the user's own come first
        args["options"] = " ".join(f"-c tcp_{key}={value}" for key, value in KEEPALIVE.items())
    return args


def _sqlite_folder(path: Path) -> None:
    """Create the SQLite file's folder, or say in one line why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the folder of SQLite file '{path}': "
            f"{(exc.strerror or str(exc)).lower()}; pass --storage sqlite:///WRITABLE/PATH.db"
        ) from None


def _read_only_reason(path: Path) -> str | None:
    """Why SQLite cannot write ``path`` (it also writes ``-wal``/``-shm`` files beside it)."""
    if path.exists() and not os.access(path, os.W_OK):
        return "the file is read-only"
    if not os.access(path.parent, os.W_OK):
        return f"its folder '{path.parent}' is read-only"
    for side in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        if side.exists() and not os.access(side, os.W_OK):
            return f"'{side.name}' beside it is read-only"
    return None


def check_writable_sqlite(path: Path) -> None:
    """Raise StorageError in one line when the SQLite file at ``path`` cannot be written.

    ``os.access`` asks the kernel, so a read-only mount and an immutable file (``chattr +i``)
    count even for root. Without this check the first write fails deep inside a worker.
    """
    reason = _read_only_reason(path)
    if reason is not None:
        raise StorageError(
            f"cannot write the SQLite storage '{path}': {reason}; make it writable (file and "
            "folder: SQLite writes '-wal' and '-shm' files beside it) or pass --storage "
            "sqlite:///OTHER.db"
        )


def _sqlite_wal(path: Path) -> None:
    # WAL lets readers (the dashboard, 'study show') work while workers write.
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        reason = _read_only_reason(path)
        hint = f" ({reason})" if reason else ""
        raise StorageError(
            f"cannot open SQLite file '{path}': {exc}{hint}; check the path and its permissions"
        ) from None


# How long one attempt waits for a study's budget lock (seconds); it is held for an `ask`.
LOCK_WAIT_SECONDS = 30.0


@contextlib.contextmanager
def budget_lock(storage: BaseStorage, study_name: str) -> Iterator[None]:
    """Serialise "count the trials, then ask for one" across all workers of a study.

    PostgreSQL: a session advisory lock on the server, so workers on any machine agree.
    SQLite: an ``flock`` on a file beside the database (one machine, by construction).
    Other storages (the gRPC proxy, MySQL): no lock; see ``has_budget_lock``.
    """
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    if not has_budget_lock(storage):
        yield
        return
    assert isinstance(storage, RDBStorage)
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
    with storage.engine.connect() as connection:
        # Bounded: a worker cut off while it holds the lock blocks the others only until
        # the server drops its session (KEEPALIVE); until then a waiter's attempt ends here
        # with a lock timeout, a transient error that ``retrying`` retries and logs.
        connection.execute(
            sqlalchemy.text(f"SET LOCAL lock_timeout = {int(LOCK_WAIT_SECONDS * 1000)}")
        )
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            connection.commit()


def has_budget_lock(storage: BaseStorage) -> bool:
    """Whether ``budget_lock`` really locks (SQLite, PostgreSQL) for this storage."""
    return isinstance(storage, RDBStorage) and (
        sqlite_path(str(storage.engine.url)) is not None
        or storage.engine.dialect.name == "postgresql"
    )


def study_names(storage: BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage)]
