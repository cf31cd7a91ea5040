"""Shared fixtures: study storages on SQLite and on the real PostgreSQL server, one cache.

``scripts/test`` starts a private PostgreSQL cluster and exports:

- ``TLOPT_TEST_POSTGRES_URL``: a SQLAlchemy URL (``postgresql+psycopg://...``) of a database
  whose role may create databases;
- ``TLOPT_REQUIRE_POSTGRES=1``: a missing server fails the PostgreSQL tests instead of
  skipping them;
- ``TLOPT_TEST_PGDATA``, ``TLOPT_TEST_PGCTL``, ``TLOPT_TEST_PGLOG``: the cluster's data
  directory, its ``pg_ctl`` and its log, so that tests can stop and restart the server.

Run by hand, ``pytest`` skips the PostgreSQL tests unless those are set.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import URL, make_url

from tlopt import once
from tlopt.tune.context import forget_sources

PgAdmin = Callable[..., list[tuple[Any, ...]]]

# The data and model of the tiny studies the tests run: scikit-learn's real digits at 16 px
# on timm's small test network, so that a trial takes about a second on a CPU.
TINY_DATA_MODEL = """[data]
source = "digits"
image_size = 16
[model]
backbone = "test_efficientnet"
weights = "none"
"""


@pytest.fixture(autouse=True)
def _lines_said_anew() -> None:
    """Lines said once a process (``tlopt.once``) are said again in each test, and each test
    opens its data afresh (a process keeps what it opened: ``open_config_source``)."""
    once.forget()
    forget_sources()


@pytest.fixture(autouse=True)
def _shared_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One decoded-image cache for the whole run; a user's TLOPT_STORAGE never leaks in.

    Each test runs in its own temporary folder: what tlopt writes relative to the working
    directory (the default storage ``sqlite:///studies/tlopt.db``, a PostgreSQL study's
    ``studies/artifacts``) lands there, never in the checkout. Subprocesses inherit it.
    """
    monkeypatch.setenv("TLOPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("TLOPT_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)


def _require_or_skip(reason: str) -> None:
    """Fail when the test run requires PostgreSQL (``scripts/test``), else skip."""
    if os.environ.get("TLOPT_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (TLOPT_REQUIRE_POSTGRES=1: PostgreSQL tests must run)")
    pytest.skip(f"{reason}; run scripts/test to start a PostgreSQL server")


def _connect(url: URL, dbname: str | None = None) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        dbname=dbname or url.database,
        autocommit=True,
        connect_timeout=10,
    )


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The SQLAlchemy URL of the test server's main database (``TLOPT_TEST_POSTGRES_URL``)."""
    url = os.environ.get("TLOPT_TEST_POSTGRES_URL")
    if not url:
        _require_or_skip("TLOPT_TEST_POSTGRES_URL is not set")
        raise AssertionError("unreachable")  # pytest.skip/fail raise
    return url


@pytest.fixture
def pg_admin(postgres_url: str) -> PgAdmin:
    """A function that runs one SQL statement on the test server and returns its rows.

    ``pg_admin(sql, params=None, dbname=None)`` connects in autocommit mode (so ``CREATE
    DATABASE`` works) to ``dbname``, by default the main test database, and returns all rows
    (an empty list for statements that return none).
    """
    url = make_url(postgres_url)

    def run(sql: str, params: Any = None, dbname: str | None = None) -> list[tuple[Any, ...]]:
        with _connect(url, dbname) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    return run


@pytest.fixture
def pg_storage_url(postgres_url: str, pg_admin: PgAdmin) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    name = f"tlopt_t_{secrets.token_hex(6)}"
    pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_storage_url(tmp_path: Path) -> str:
    """The URL of a new SQLite file in the test's temporary directory."""
    return f"sqlite:///{tmp_path}/studies.db"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def storage_url(request: pytest.FixtureRequest) -> str:
    """A clean study storage URL, once on SQLite and once on PostgreSQL."""
    fixture = "sqlite_storage_url" if request.param == "sqlite" else "pg_storage_url"
    url: str = request.getfixturevalue(fixture)
    return url


@dataclass(frozen=True)
class PgServer:
    """The private test cluster that ``scripts/test`` started, controlled with ``pg_ctl``.

    Commands run as the data directory's owner (``postgres`` when the tests run as root).
    """

    data_dir: Path
    pg_ctl: Path
    log_file: Path

    def _pg_ctl(self, *args: str) -> None:
        command = [str(self.pg_ctl), "-D", str(self.data_dir), *args]
        owner = pwd.getpwuid(self.data_dir.stat().st_uid).pw_name
        if os.geteuid() == 0 and owner != "root":
            command = ["runuser", "-u", owner, "--", *command]
        # No captured pipes: the server inherits pg_ctl's output, and would hold them open.
        subprocess.run(command, check=True, cwd="/", stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        """Stop the server at once, ending every connection (``-m fast``)."""
        self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl("-w", "-t", "60", "-l", str(self.log_file), "start")

    def restart(self) -> None:
        """Restart the server, ending every connection."""
        self._pg_ctl("-w", "-t", "60", "-m", "fast", "-l", str(self.log_file), "restart")

    def is_running(self) -> bool:
        """Whether the server is running (``pg_ctl status``)."""
        try:
            self._pg_ctl("status")
        except subprocess.CalledProcessError:
            return False
        return True


def pg_server_from_env() -> PgServer | None:
    """The test cluster named by ``TLOPT_TEST_PGDATA``/``TLOPT_TEST_PGCTL``, if any."""
    data_dir = os.environ.get("TLOPT_TEST_PGDATA")
    pg_ctl = os.environ.get("TLOPT_TEST_PGCTL")
    if not data_dir or not pg_ctl:
        return None
    log_file = os.environ.get("TLOPT_TEST_PGLOG") or str(Path(data_dir).parent / "server.log")
    return PgServer(Path(data_dir), Path(pg_ctl), Path(log_file))


@pytest.fixture
def pg_server(postgres_url: str) -> Iterator[PgServer]:
    """Control of the test server, for tests that stop or restart it.

    Skipped when the server is not the private cluster of ``scripts/test`` (a server of the
    user's, given by ``TLOPT_TEST_POSTGRES_URL`` alone, is never stopped). The server is
    running again when the test ends, whatever the test did.
    """
    server = pg_server_from_env()
    if server is None:
        pytest.skip("the PostgreSQL server was not started by scripts/test; cannot restart it")
    try:
        yield server
    finally:
        if not server.is_running():
            server.start()


@pytest.fixture
def restart_postgres(pg_server: PgServer) -> Callable[[], None]:
    """A function that restarts the test server (see :class:`PgServer`)."""
    return pg_server.restart


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tlopt ARGS`` as a user would, in the test's folder (see above).

    It runs in a process group of its own, killed whole when the test ends: a supervisor's
    workers never outlive the test, whether it passed, failed, timed out or was interrupted.
    """
    return run_in_group(
        [sys.executable, "-m", "tlopt", *args],
        timeout,
        f"tlopt {' '.join(args[:2])}",
        env={**os.environ, **(env or {})},
    )


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process group ``proc`` leads (it and whatever it started), if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_in_group(
    command: list[str], timeout: float, what: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in its own process group; the group is killed whole when this returns.

    On a timeout the test fails with the command's last stderr; on any other way out (a
    failed assertion elsewhere cannot reach here, but Ctrl-C can) the group is killed before
    the exception goes on. After a normal exit, children the command left behind are killed.
    """
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{what} ran past {timeout} s: {err[-2000:]}")
    except BaseException:
        kill_group(proc)
        proc.communicate()
        raise
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
