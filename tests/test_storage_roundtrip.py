"""A study written to each storage reads back whole from a fresh connection.

This is the contract every tlopt storage relies on: studies are plain Optuna studies, and a
worker that only knows the URL and the study name sees the same attributes, trials, values and
parameters as the process that wrote them. It runs on SQLite and on the real PostgreSQL
server that ``scripts/test`` starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
import pytest
from sqlalchemy.engine import make_url

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


def test_study_round_trips(storage_url: str, request: pytest.FixtureRequest) -> None:
    backend = request.node.callspec.id  # "sqlite" or "postgres"
    if backend == "postgres":
        url = make_url(storage_url)
        assert url.get_backend_name() == "postgresql"
        assert url.get_driver_name() == "psycopg"

    study = optuna.create_study(
        storage=storage_url,
        study_name="flowers/head",
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.set_user_attr("split", BIG_LIST)
    study.set_user_attr("config", NESTED)
    study.optimize(_objective, n_trials=3)
    written = study.trials

    storage = optuna.storages.RDBStorage(storage_url)
    try:
        assert (
            storage.engine.dialect.name == {"sqlite": "sqlite", "postgres": "postgresql"}[backend]
        )
        loaded = optuna.load_study(study_name="flowers/head", storage=storage)

        attrs: dict[str, Any] = loaded.user_attrs
        assert attrs["split"] == BIG_LIST
        assert attrs["config"] == NESTED
        assert [t.state for t in loaded.trials] == [optuna.trial.TrialState.COMPLETE] * 3
        assert [t.values for t in loaded.trials] == [t.values for t in written]
        assert [t.params for t in loaded.trials] == [t.params for t in written]
        assert [t.user_attrs for t in loaded.trials] == [t.user_attrs for t in written]
        assert loaded.best_trial.number == study.best_trial.number
        assert loaded.best_value == pytest.approx(
            min(t.value for t in written if t.value is not None)
        )
        assert loaded.direction == optuna.study.StudyDirection.MINIMIZE
    finally:
        storage.engine.dispose()


@pytest.mark.postgres
def test_postgres_rows_live_on_the_server(
    pg_storage_url: str, pg_admin: Callable[..., list[tuple[Any, ...]]]
) -> None:
    """The trials are rows in the server's database, not in some local fallback."""
    study = optuna.create_study(storage=pg_storage_url, study_name="rows")
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=3)

    database = make_url(pg_storage_url).database
    rows = pg_admin("SELECT count(*) FROM trials WHERE state = 'COMPLETE'", dbname=database)
    assert rows == [(3,)]
    version = pg_admin("SHOW server_version_num")[0][0]
    assert int(version) >= 120000
