"""tlopt's storage code on SQLite and on the real PostgreSQL server that ``scripts/test`` starts.

A study written through tlopt (``resolve_url``, ``open_storage``, ``study.create``) reads back
whole through tlopt (``study.load``, ``list_studies``, ``show``) from a fresh connection: a
worker that only knows the URL and the study name sees the same attributes, trials, values and
parameters as the process that wrote them. The budget lock that serialises "count the trials,
then ask" holds across connections (a ``flock`` beside a SQLite file, an advisory lock on the
server).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import RDBStorage
from sqlalchemy.engine import make_url

from tests.conftest import TINY_DATA_MODEL
from tlopt.config import load_config
from tlopt.errors import StudyError
from tlopt.names import ATTR
from tlopt.tune import study as studies
from tlopt.tune.storage import (
    budget_lock,
    has_budget_lock,
    open_storage,
    resolve_url,
    sqlite_path,
    study_names,
)

# A study's attributes hold the config snapshot, the class list and the split: far bigger than
# a short string column. 5,000 indices stand for a split of a mid-sized image folder.
BIG_LIST = list(range(5_000))
NESTED = {
    "search": {"batch_size": [8, 16, 32], "epochs": [10, 25, 50, 75, 100, 150]},
    "decay": {"step": {"step_size": 10, "gamma": 0.5}, "constant": {}},
    "classes": ["ants", "bees", "çà et là", "🐝"],
    "flags": {"mirror": True, "weights": None, "lr": 1e-3},
}


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    batch_size = trial.suggest_categorical("batch_size", [8, 16, 32])
    trial.set_user_attr("history", [x, x / 2, x / 4])
    return (x - 2.0) ** 2 + batch_size / 100


def _backend(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["storage_url"])  # "sqlite" or "postgres"


def _as_user_writes_it(
    storage_url: str, backend: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    """The URL as a user types it: a relative SQLite path, or plain ``postgresql://``."""
    if backend == "postgres":
        assert storage_url.startswith("postgresql+psycopg://")
        return "postgresql://" + storage_url[len("postgresql+psycopg://") :]
    monkeypatch.chdir(tmp_path)
    return "sqlite:///here/studies.db"


@contextlib.contextmanager
def _opened(url: str, **kwargs: Any) -> Iterator[RDBStorage]:
    storage = open_storage(url, **kwargs)
    assert isinstance(storage, RDBStorage)
    try:
        yield storage
    finally:
        storage.engine.dispose()


def test_resolve_url_makes_the_urls_tlopt_opens(
    storage_url: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    backend = _backend(request)
    typed = _as_user_writes_it(storage_url, backend, monkeypatch, tmp_path)
    url = resolve_url(typed)
    if backend == "postgres":
        assert url == storage_url
        assert make_url(url).get_driver_name() == "psycopg"
    else:
        assert url == f"sqlite:///{tmp_path.resolve()}/here/studies.db"
    # --storage over TLOPT_STORAGE over the study file's URL.
    monkeypatch.setenv("TLOPT_STORAGE", typed)
    assert resolve_url(None, "sqlite:////elsewhere.db") == url
    assert resolve_url("sqlite:////flag.db", "sqlite:////elsewhere.db") == "sqlite:////flag.db"
    monkeypatch.delenv("TLOPT_STORAGE")
    assert resolve_url(None, typed) == url


def test_study_round_trips(
    storage_url: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    backend = _backend(request)
    url = _as_user_writes_it(storage_url, backend, monkeypatch, tmp_path)

    with _opened(resolve_url(url)) as storage:
        dialect = storage.engine.dialect.name
        assert dialect == {"sqlite": "sqlite", "postgres": "postgresql"}[backend]
        assert storage.get_heartbeat_interval() == 30  # heartbeats on: dead workers' trials retry
        path = sqlite_path(str(storage.engine.url))
        if path is not None:  # the folder is made; WAL lets readers work while workers write
            assert path == tmp_path.resolve() / "here" / "studies.db" and path.is_file()
            with contextlib.closing(sqlite3.connect(path)) as con:
                assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        study = optuna.create_study(
            storage=storage,
            study_name="flowers/head",
            direction="minimize",
            sampler=optuna.samplers.RandomSampler(seed=0),
        )
        study.set_user_attr("split", BIG_LIST)
        study.set_user_attr("config", NESTED)
        study.optimize(_objective, n_trials=3)
        written = study.trials

    # A fresh engine, read-only, as 'study show' and the workers open it.
    loaded = studies.load("flowers/head", url)
    attrs: dict[str, Any] = loaded.user_attrs
    assert attrs["split"] == BIG_LIST
    assert attrs["config"] == NESTED
    assert [t.state for t in loaded.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.values for t in loaded.trials] == [t.values for t in written]
    assert [t.params for t in loaded.trials] == [t.params for t in written]
    assert [t.user_attrs for t in loaded.trials] == [t.user_attrs for t in written]
    assert loaded.best_trial.number == min(written, key=lambda t: t.value or 0.0).number
    assert loaded.best_value == pytest.approx(min(t.value for t in written if t.value is not None))
    assert loaded.direction == optuna.study.StudyDirection.MINIMIZE
    (row,) = studies.list_studies(url)
    assert (row["name"], row["complete"], row["pruned"], row["failed"]) == ("flowers/head", 3, 0, 0)
    assert row["best_value"] == pytest.approx(loaded.best_value)


def test_created_study_reads_back_through_tlopt(
    storage_url: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """``study.create`` writes the config snapshot, classes and counts; load/show read them."""
    url = _as_user_writes_it(storage_url, _backend(request), monkeypatch, tmp_path)
    path = tmp_path / "tiny.toml"
    artifacts = tmp_path / "artifacts"
    path.write_text(
        f'name = "tiny"\nseed = 5\n{TINY_DATA_MODEL}[storage]\nartifacts = "{artifacts}"\n'
    )
    config = load_config(path)
    assert studies.create(config, "head", url, dry_run=True).created is False
    assert studies.list_studies(url) == []  # a dry run creates nothing
    plan = studies.create(config, "head", url)
    assert plan.created and plan.classes == [str(i) for i in range(10)]

    study = studies.load("tiny/head", url)
    attrs = study.user_attrs
    assert attrs[ATTR + "config"] == studies.snapshot(config)
    assert attrs[ATTR + "stage"] == "head"
    assert attrs[ATTR + "classes"] == plan.classes
    assert attrs[ATTR + "counts"] == plan.counts and sum(plan.counts.values()) == 1797
    assert attrs[ATTR + "artifacts"] == str(artifacts) and artifacts.is_dir()
    shown = studies.show("tiny/head", url)
    assert shown["trials"] == [] and shown["attrs"]["counts"] == plan.counts
    with pytest.raises(StudyError, match="already exists"):
        studies.create(config, "head", url)
    studies.delete("tiny/head", url)
    with _opened(resolve_url(url)) as storage:
        assert study_names(storage) == []


def test_budget_lock_serialises_workers_across_connections(
    storage_url: str, request: pytest.FixtureRequest
) -> None:
    """Two storages (two engines, as two workers have) never hold one study's lock at once."""
    backend = _backend(request)
    with _opened(storage_url) as first, _opened(storage_url) as second:
        assert has_budget_lock(first) and has_budget_lock(second)
        entered = threading.Event()

        def second_worker() -> None:
            with budget_lock(second, "flowers/head"):
                entered.set()

        waiter = threading.Thread(target=second_worker, daemon=True)
        with budget_lock(first, "flowers/head"):
            if backend == "postgres":
                assert _advisory_locks(request, storage_url) == 1
            waiter.start()
            assert not entered.wait(1.5), "a second worker entered while the first held the lock"
            with budget_lock(second, "flowers/freeze1"):  # another study does not wait
                pass
        assert entered.wait(30), "the second worker never got the lock after it was freed"
        waiter.join(30)
        if backend == "postgres":
            assert _advisory_locks(request, storage_url) == 0


def _advisory_locks(request: pytest.FixtureRequest, storage_url: str) -> int:
    pg_admin: Callable[..., list[tuple[Any, ...]]] = request.getfixturevalue("pg_admin")
    database = make_url(storage_url).database
    rows = pg_admin(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = %s",
        (database,),
    )
    return int(rows[0][0])


@pytest.mark.postgres
def test_postgres_rows_live_on_the_server(
    pg_storage_url: str, pg_admin: Callable[..., list[tuple[Any, ...]]]
) -> None:
    """The trials are rows in the server's database, not in some local fallback."""
    with _opened(resolve_url(pg_storage_url)) as storage:
        study = optuna.create_study(storage=storage, study_name="rows")
        study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=3)

    database = make_url(pg_storage_url).database
    rows = pg_admin("SELECT count(*) FROM trials WHERE state = 'COMPLETE'", dbname=database)
    assert rows == [(3,)]
    version = pg_admin("SHOW server_version_num")[0][0]
    assert int(version) >= 120000
