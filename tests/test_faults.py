"""Faults lose nothing: a trial ended elsewhere, a storage outage, a held lock, a bad value.

Each test names the fault it runs and what must survive it. The outage and the lock run
against the real PostgreSQL server that ``scripts/test`` starts; workers are real processes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import optuna
import psycopg
import pytest
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from tests.conftest import PgServer, cli
from tests.test_service import (  # noqa: F401 (_kill_leftover_workers: an autouse fixture)
    _fine_tuning_study,
    _kill_leftover_workers,
    finish,
    start_worker,
    wait_until,
)
from tlopt.config import load_config
from tlopt.names import ATTR
from tlopt.tune import storage as storages
from tlopt.tune import study as studies
from tlopt.tune.budget import tell_trial
from tlopt.tune.outcomes import fail_and_requeue
from tlopt.tune.resilience import fail_stale_trials, retrying
from tlopt.tune.storage import budget_lock, open_storage
from tlopt.tune.worker import work


def _fail_as_a_stale_check_does(storage: Any, study: optuna.Study, trial_id: int) -> None:
    """What another worker's (or the proxy's) stale-trial check does: FAIL, then a retry."""
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback(3, inherit_intermediate_values=True)(
        study, storage.get_trial(trial_id)
    )


# --- Recording is idempotent: a trial taken from a live worker costs a line -----------------


def test_telling_a_trial_failed_elsewhere_is_not_an_error(sqlite_storage_url: str) -> None:
    storage = open_storage(sqlite_storage_url, 1, 4)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    _fail_as_a_stale_check_does(storage, study, trial._trial_id)
    assert tell_trial(study, trial, 0.5, TrialState.COMPLETE) is False  # Optuna: ValueError
    assert study.trials[trial.number].state == TrialState.FAIL
    again = study.ask()
    assert tell_trial(study, again, 0.5, TrialState.COMPLETE) is True
    assert tell_trial(study, again, 0.5, TrialState.COMPLETE) is True  # a repeated tell


def test_requeueing_on_sigterm_skips_a_trial_failed_elsewhere(sqlite_storage_url: str) -> None:
    """A worker stopping re-queues all its trials, though one was failed (and queued) already."""
    storage = open_storage(sqlite_storage_url, 1, 4)
    study = optuna.create_study(study_name="s", storage=storage)
    taken, mine = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), study.ask()
    _fail_as_a_stale_check_does(storage, study, taken._trial_id)
    for trial in (taken, mine):
        fail_and_requeue(study, trial, "worker stopped", 3)
    retries = [t.system_attrs.get("failed_trial") for t in study.trials[2:]]
    assert sorted(retries) == [taken.number, mine.number]  # one retry each, none twice
    assert study.trials[mine.number].user_attrs[ATTR + "error"] == "worker stopped"


def test_requeueing_a_retry_that_was_retried_elsewhere_queues_it_once(
    sqlite_storage_url: str,
) -> None:
    """Trial 0 was retried as 1; 1 too was failed and retried (as 2) by a stale check while
    its worker stopped. Optuna keeps the first number in every retry's ``failed_trial`` (2's
    is 0), so only the retry history tells that 1 has its retry already."""
    storage = open_storage(sqlite_storage_url, 1, 4)
    study = optuna.create_study(study_name="s", storage=storage)
    first = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    _fail_as_a_stale_check_does(storage, study, first._trial_id)
    retry = study.ask()  # the WAITING retry of trial 0
    assert retry.number == 1 and retry.params == first.params
    _fail_as_a_stale_check_does(storage, study, retry._trial_id)
    fail_and_requeue(study, retry, "worker stopped", 3)
    history = RetryHeartbeatStaleTrialCallback.retry_history
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [(t.number, history(t)) for t in waiting] == [(2, [0, 1])]  # 1's one retry


@pytest.mark.slow
def test_a_trial_ended_elsewhere_mid_run_costs_the_worker_nothing(
    sqlite_storage_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trial is failed and queued again while it trains: the worker logs it and goes on.

    The stale check's two writes (FAIL, then the retry) run right after the trial's second
    report, in the worker's thread: from a thread of their own, a worker that ran between
    them (seen on a loaded machine) asked a new trial before the retry was queued."""
    name = _fine_tuning_study(sqlite_storage_url, tmp_path, n_trials=1, epochs=8)
    storage = open_storage(sqlite_storage_url, 1, 4)
    study = optuna.load_study(study_name=name, storage=storage)
    report, taken = optuna.trial.Trial.report, []

    def report_then_lose_the_trial(trial: optuna.trial.Trial, value: float, step: int) -> None:
        report(trial, value, step)
        if step == 2 and not taken:  # another worker's stale check takes it now
            taken.append(trial.number)
            _fail_as_a_stale_check_does(storage, study, trial._trial_id)

    monkeypatch.setattr(optuna.trial.Trial, "report", report_then_lose_the_trial)
    summary = work(name, sqlite_storage_url)
    assert taken == [0]
    assert (summary.taken, summary.complete, summary.failed) == (1, 1, 0)
    seen = [(t.number, t.state.name, t.system_attrs.get("failed_trial")) for t in study.trials]
    assert study.trials[0].state == TrialState.FAIL, seen
    (retry,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert retry.system_attrs["failed_trial"] == 0, seen
    assert not study.get_trials(states=(TrialState.RUNNING,)), seen
    lines = [r.message for r in caplog.records if "was ended elsewhere" in r.message]
    assert len(lines) == 1, lines


# --- Liveness after an outage: live workers beat first, nobody judges early ------------------


def test_no_stale_check_until_connected_for_a_grace_period(sqlite_storage_url: str) -> None:
    from tlopt.tune.resilience import REACHABILITY

    storage = open_storage(sqlite_storage_url, 1, 2)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # its beat is older than the grace period
    REACHABILITY.lost()  # this process has just lost the storage ...
    retrying("a read", lambda: storage.get_study_id_from_name("s"))  # ... and reached it again
    fail_stale_trials(study, storage)
    assert study.trials[trial.number].state == TrialState.RUNNING  # too early to judge
    time.sleep(2.2)
    fail_stale_trials(study, storage)
    assert study.trials[trial.number].state == TrialState.FAIL


# About a minute: a 20 s outage with three worker processes; the only test that an outage
# longer than the grace period fails no live trial.
@pytest.mark.slow
@pytest.mark.postgres
def test_an_outage_longer_than_the_grace_period_fails_no_live_trial(
    pg_storage_url: str, tmp_path: Path, pg_server: PgServer
) -> None:
    """PostgreSQL down for 2.5 grace periods while two workers train and a third waits.

    A grace period of 8 s, not 4: three workers beside a loaded machine's other work (the
    suite's second worker, a CPU hog) must beat again within it once the server is back."""
    name = _fine_tuning_study(pg_storage_url, tmp_path, n_trials=2, epochs=6, grace=8)
    workers = [start_worker(name, pg_storage_url) for _ in range(3)]

    def two_trials_training() -> bool:
        study = optuna.load_study(study_name=name, storage=pg_storage_url)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return len(running) == 2 and all(len(t.intermediate_values) >= 2 for t in running)

    wait_until(two_trials_training, 300, "two trials past their first epoch")
    pg_server.stop()
    time.sleep(20)  # 2.5 grace periods
    pg_server.start()
    outputs = [finish(w, 600) for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    study = optuna.load_study(study_name=name, storage=pg_storage_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert not any("resumes after epoch" in o for o in outputs)  # no trial ran twice
    assert any("heartbeat" in o and "back after" in o for o in outputs)


# --- The budget lock is bounded, and the connections keep alive -----------------------------


@pytest.mark.postgres
def test_a_held_budget_lock_times_out_and_is_retried(
    pg_storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storages, "LOCK_WAIT_SECONDS", 1.0)
    storage = open_storage(pg_storage_url, 1, 4)
    optuna.create_study(study_name="s", storage=storage)
    url = make_url(pg_storage_url)
    holder = psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password,
        dbname=url.database, autocommit=True,
    )  # fmt: skip
    key = int.from_bytes(storages.hashlib.sha256(b"s").digest()[:8], "big", signed=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (key,))  # a worker cut off while holding it
    outcome: list[BaseException | None] = []

    def one_attempt() -> None:
        try:
            with budget_lock(storage, "s"):
                outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    attempt = threading.Thread(target=one_attempt, daemon=True)
    began = time.monotonic()
    attempt.start()
    attempt.join(20)
    assert not attempt.is_alive(), "budget_lock waited with no bound"
    assert time.monotonic() - began < 10
    assert isinstance(outcome[0], sqlalchemy.exc.OperationalError), outcome
    assert "lock timeout" in str(outcome[0])

    threading.Timer(2.0, holder.close).start()  # the server ends the holder's session
    began = time.monotonic()
    retrying("asking for a trial", lambda: budget_lock(storage, "s").__enter__())
    assert 1.5 < time.monotonic() - began < 30


@pytest.mark.postgres
def test_postgres_connections_keep_alive(pg_storage_url: str) -> None:
    storage = open_storage(pg_storage_url, 1, 4)
    assert isinstance(storage, optuna.storages.RDBStorage)
    with storage.engine.connect() as connection:
        shown = {  # PostgreSQL shows seconds with or without their unit, by version
            name: str(connection.execute(sqlalchemy.text(f"SHOW tcp_{name}")).scalar()).rstrip("s")
            for name in ("keepalives_idle", "keepalives_interval", "keepalives_count")
        }
    assert shown == {
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
    }


# --- A bad searched value: refused at create, or fails its own trial only --------------------


BAD_CUT = """
name = "cuts"
n_trials = {n_trials}
[data]
source = "digits"
image_size = 16
[model]
backbone = "test_efficientnet"
weights = "none"
[search]
cut = {cuts}
epochs = [1]
batch_size = [32]
[pruner]
type = "nop"
"""


@pytest.mark.slow
def test_a_cut_the_backbone_lacks_is_refused_at_study_create(tmp_path: Path) -> None:
    path = tmp_path / "cuts.toml"
    path.write_text(BAD_CUT.format(n_trials=2, cuts="[1, 9]"))
    done = cli("study", "create", "--config", str(path), "--stage", "head")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "search.cut" in lines[0] and "cut = 9" in lines[0], lines
    assert "stages 0..4" in lines[0]
    done = cli("study", "list")
    assert "cuts/head" not in done.stdout  # nothing was created


def test_a_trial_that_the_model_refuses_fails_alone(
    sqlite_storage_url: str, tmp_path: Path
) -> None:
    """A study made before the check (or edited): its bad trial FAILs, the worker goes on."""
    path = tmp_path / "cuts.toml"
    path.write_text(BAD_CUT.format(n_trials=1, cuts="[1, 2]"))
    studies.create(load_config(path), "head", sqlite_storage_url)
    study = optuna.load_study(study_name="cuts/head", storage=sqlite_storage_url)
    stored = study.user_attrs[ATTR + "config"]
    stored["search"]["cut"] = [1, 9]
    study.set_user_attr(ATTR + "config", stored)
    study.enqueue_trial({"cut": 9})
    study.enqueue_trial({"cut": 1})
    summary = work("cuts/head", sqlite_storage_url)
    assert (summary.complete, summary.failed) == (1, 1)
    bad, good = study.trials
    assert bad.state == TrialState.FAIL and "cut = 9" in bad.user_attrs[ATTR + "error"]
    assert good.state == TrialState.COMPLETE
    assert not study.get_trials(states=(TrialState.WAITING,))  # not queued again to fail again
