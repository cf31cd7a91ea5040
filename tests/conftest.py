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
import fcntl
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

# Two pytest-xdist workers on two cores: one torch thread each (and in the tlopt processes they
# start), not torch's pool of every core per worker. Set before any test module imports torch;
# tests of the thread choice itself clear it (monkeypatch.delenv).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The data and model of the tiny studies the tests run: scikit-learn's real digits at 16 px
# on timm's small test network, so that a trial takes about a second on a CPU.
TINY_DATA_MODEL = """[data]
source = "digits"
image_size = 16
[model]
backbone = "test_efficientnet"
weights = "none"
"""


# Modules whose tests share a costly module- or session-scoped fixture, run on one pytest-xdist
# worker so that it is built once: the report's stage studies, the browser's finished study,
# and the digits export that test_export_preprocess and test_predict both read.
XDIST_GROUPS = {
    "tests/test_report.py": "report",
    "tests/test_browser.py": "browser",
    "tests/test_export_preprocess.py": "digits-export",
    "tests/test_predict.py": "digits-export",
}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With ``--dist loadgroup``: the tests of an ``XDIST_GROUPS`` module go to one worker as
    one unit, every other test alone (as ``--dist load``).

    pytest-xdist's own xdist_group mark does nothing under pytest 9.2 (xdist 3.8 renames
    ``item._nodeid``, which pytest 9 no longer reads), so the groups are kept here, by module.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModuleGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return XDIST_GROUPS.get(nodeid.split("::", 1)[0], nodeid)

    return ByModuleGroup(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, each module's in its order: with two pytest-xdist workers the
    run ends on short tests, not on a long one that one worker runs while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's temporary folder, the same for every pytest-xdist worker of the run.

    Each xdist worker has a base folder of its own (``.../pytest-N/popen-gw0``); what the
    workers share (the decoded-image cache, the PostgreSQL lock) lies in its parent.
    """
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's decoded-image cache (``TLOPT_CACHE``): decoded once for all workers (the
    cache renames whole files into place, so two workers building one entry is safe)."""
    return run_root(tmp_path_factory) / "cache"


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
    monkeypatch.setenv("TLOPT_CACHE", str(shared_cache(tmp_path_factory)))
    monkeypatch.delenv("TLOPT_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _postgres_turns(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """PostgreSQL tests share the server; a test that stops or restarts it has it alone.

    With pytest-xdist (``scripts/test`` runs two workers) a test using the server holds a
    shared ``flock`` on a file of the run for its whole length, databases made and dropped
    included; one using ``pg_server`` holds it exclusively, so no other worker's test is
    connected while the server is down. A turnstile lock, taken briefly by every test and
    held by a waiting exclusive one, keeps a stream of shared holders from starving it.
    Tests without PostgreSQL take nothing and run beside it.
    """
    uses = request.node.get_closest_marker("postgres") or "postgres_url" in request.fixturenames
    if not uses:
        yield
        return
    root = run_root(tmp_path_factory)
    exclusive = "pg_server" in request.fixturenames
    with open(root / "postgres.turnstile", "a") as gate, open(root / "postgres.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
def export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A head study on digits PNGs at 48 px and its ``export-best --json``, built once per
    process for tests/test_export_preprocess.py and tests/test_predict.py (which only read
    it): see ``build_export`` there."""
    from tests.test_export_preprocess import build_export

    return build_export(tmp_path_factory.mktemp("export"))


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
