"""Workers behind `tlopt storage proxy` (Optuna's gRPC proxy) and an S3-compatible artifact store.

The proxy runs in front of the real PostgreSQL server; the S3 store is moto's S3 server, a real
HTTP endpoint that boto3 talks to as to any S3-compatible service (AWS, MinIO, Ceph).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import kill_group
from tests.test_service import (  # noqa: F401 (_kill_leftover_workers: an autouse fixture)
    CONFIG,
    _kill_leftover_workers,
    finish,
    finished,
    make_config,
    start_worker,
    states,
    two_epochs_checkpointed,
    wait_until,
)
from tlopt.config import load_config
from tlopt.tune import study as studies
from tlopt.tune.budget import over_budget as _over_budget
from tlopt.tune.proxy import StaleTrialWatcher
from tlopt.tune.storage import open_storage
from tlopt.tune.worker import work

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def proxy(pg_storage_url: str) -> Iterator[str]:
    """A running `tlopt storage proxy` in front of the test database; yields its grpc:// URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlopt", "storage", "proxy", "--port", str(port)]
        + ["--grace-period", "4"],
        env={**os.environ, "TLOPT_STORAGE": pg_storage_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"grpc://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 60, "the storage proxy")
        yield url
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output[-2000:]
        assert "tlopt-test-pw" not in output  # the database password is never printed
    finally:
        kill_group(proc)


def _answers(url: str) -> bool:
    from tlopt.errors import StorageError
    from tlopt.tune.proxy import open_proxy

    try:
        open_proxy(url, timeout=1).close()  # type: ignore[attr-defined]
        return True
    except StorageError:
        return False


def _config(tmp_path: Path, n_trials: int, epochs: int) -> Path:
    path = tmp_path / "svc.toml"
    path.write_text(CONFIG.format(n_trials=n_trials, epochs=epochs))
    return path


@pytest.mark.postgres
def test_four_workers_behind_the_proxy_share_a_budget(
    proxy: str, pg_storage_url: str, tmp_path: Path
) -> None:
    # Created through the proxy too: every command takes grpc:// like any storage URL. A
    # grace period of 30 s (as test_eight_workers_share_a_budget_of_forty): a live trial failed
    # as stale would fail the test's last check, and staleness has tests of its own here.
    studies.create(load_config(make_config(tmp_path, 12, 1, grace=30)), "head", proxy)
    procs = [start_worker("svc/head", proxy) for _ in range(4)]
    outputs = [finish(p, 900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outputs]
    counts = states("svc/head", pg_storage_url)  # read back from PostgreSQL itself
    assert finished(counts) == 12, counts
    assert counts.get(TrialState.RUNNING, 0) == 0 and counts.get(TrialState.WAITING, 0) == 0
    # Without a lock, a lost race for the last place ends FAIL with its reason, unrun.
    study = optuna.load_study(study_name="svc/head", storage=pg_storage_url)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        assert t.user_attrs.get("tlopt.error", "").startswith("over budget"), t.user_attrs
    listed = subprocess.run(
        [sys.executable, "-m", "tlopt", "study", "list", "--storage", proxy],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and "svc/head" in listed.stdout, listed.stderr


@pytest.mark.postgres
def test_the_proxy_requeues_a_killed_workers_trial(
    proxy: str, pg_storage_url: str, tmp_path: Path
) -> None:
    config = load_config(_config(tmp_path, 2, 6))  # killed after 2 epochs: 4 left
    studies.create(config, "head", proxy)
    work("svc/head", proxy, n_trials=1)
    studies.create(config, "freeze1", proxy)
    victim = start_worker("svc/freeze1", proxy)
    wait_until(
        lambda: two_epochs_checkpointed("svc/freeze1", pg_storage_url),
        300,
        "a running trial with 2 checkpointed epochs",
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    study = optuna.load_study(study_name="svc/freeze1", storage=pg_storage_url)
    killed = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0]
    # No worker runs now: the proxy alone sees the beats stop, fails and re-queues the trial.
    wait_until(
        lambda: states("svc/freeze1", pg_storage_url).get(TrialState.WAITING, 0) == 1,
        60,
        "the proxy to re-queue the killed trial",
    )
    rescuer = start_worker("svc/freeze1", proxy)
    output = finish(rescuer, 600)
    assert rescuer.returncode == 0, output[-3000:]
    study = optuna.load_study(study_name="svc/freeze1", storage=pg_storage_url)
    assert study.trials[killed.number].state == TrialState.FAIL
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == killed.params
    epochs = [h["epoch"] for h in retry[0].user_attrs["history"]]
    assert epochs == list(range(7)), epochs  # resumed: epoch 0 (its head), none repeated
    assert "resumes after epoch" in output, output[-3000:]
    assert finished(states("svc/freeze1", pg_storage_url)) == 2


def _lr(trial: optuna.Trial) -> float:
    return float(trial.suggest_categorical("lr", [0.1, 0.2]))


def test_a_retry_that_loses_the_last_place_is_queued_again_with_its_params(
    sqlite_storage_url: str,
) -> None:
    """Behind the proxy (no budget lock): a heartbeat retry asked over budget is not lost."""
    storage = open_storage(sqlite_storage_url, 1, 4)
    study = optuna.create_study(study_name="s", storage=storage)
    done = study.ask()
    study.tell(done, _lr(done))  # fills the budget of 1
    dead = study.ask()
    _lr(dead)
    dead.report(0.7, 1)
    dead.set_user_attr("tlopt.checkpoint", "checkpoint-of-epoch-1")
    study.tell(dead, state=TrialState.FAIL)  # what the stale check does to a dead worker's
    optuna.storages.RetryHeartbeatStaleTrialCallback(3, inherit_intermediate_values=True)(
        study, storage.get_trial(dead._trial_id)
    )
    retry = study.ask()  # the retry, asked by a worker that lost the race for the last place
    assert retry.params == dead.params
    assert _over_budget(study, storage, retry, budget=1)
    assert study.trials[retry.number].state == TrialState.FAIL
    (again,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert again.params == dead.params
    assert again.system_attrs["fixed_params"] == dead.params
    assert again.system_attrs["failed_trial"] == dead.number
    assert again.system_attrs["retry_history"] == [dead.number]
    assert again.user_attrs == {"tlopt.checkpoint": "checkpoint-of-epoch-1"}
    assert again.intermediate_values == {1: 0.7}
    asked = study.ask()  # the next worker runs the same point, from its checkpoint
    assert asked.number == again.number and _lr(asked) == dead.params["lr"]


def _tlopt_study(storage: Any, name: str, grace: int) -> optuna.Study:
    """A study as tlopt stores it, as far as the proxy looks: its config's grace period."""
    study = optuna.create_study(study_name=name, storage=storage)
    study.set_user_attr("tlopt.config", {"storage": {"grace_period": grace}})
    return study


def test_the_proxys_watcher_fails_a_trial_that_never_beat(sqlite_storage_url: str) -> None:
    """A worker behind the proxy that dies before its first beat: failed, then re-queued."""
    storage = open_storage(sqlite_storage_url, 1, 60)
    study = _tlopt_study(storage, "s", grace=2)  # the study's grace, not the storage's 60
    orphan = optuna.load_study(study_name="s", storage=sqlite_storage_url).ask()  # no beat
    watcher = StaleTrialWatcher(storage)  # type: ignore[arg-type]
    watcher.sweep()  # first sight: a heartbeat
    assert study.trials[orphan.number].state == TrialState.RUNNING
    time.sleep(3.5)
    watcher.sweep()
    assert study.trials[orphan.number].state == TrialState.FAIL
    assert [t.system_attrs["failed_trial"] for t in study.trials[1:]] == [orphan.number]


def test_the_proxys_watcher_leaves_other_studies_alone(sqlite_storage_url: str) -> None:
    """A plain Optuna study in the same database: its long RUNNING trial is never failed."""
    storage = open_storage(sqlite_storage_url, 1, 2)
    plain = optuna.create_study(study_name="someone-elses", storage=storage)
    long_running = plain.ask()
    ours = _tlopt_study(storage, "ours", grace=2)
    orphan = ours.ask()
    watcher = StaleTrialWatcher(storage)  # type: ignore[arg-type]
    watcher.sweep()
    time.sleep(3.5)
    watcher.sweep()
    assert ours.trials[orphan.number].state == TrialState.FAIL  # the watcher does watch
    assert [t.state for t in plain.trials] == [TrialState.RUNNING]
    assert plain.trials[long_running.number].system_attrs == {}  # no beat, no retry copy


def test_the_proxys_watcher_fails_nothing_right_after_an_outage(
    sqlite_storage_url: str,
) -> None:
    """After the database comes back, the workers behind the proxy get a grace period to beat."""
    from tlopt.tune.resilience import REACHABILITY

    storage = open_storage(sqlite_storage_url, 1, 60)
    study = _tlopt_study(storage, "s", grace=2)
    orphan = optuna.load_study(study_name="s", storage=sqlite_storage_url).ask()
    watcher = StaleTrialWatcher(storage)  # type: ignore[arg-type]
    watcher.sweep()
    time.sleep(3.5)  # the trial is stale now ...
    REACHABILITY.lost()  # ... but the proxy has just lost the database
    REACHABILITY.reached()  # and reached it again
    watcher.sweep()
    assert study.trials[orphan.number].state == TrialState.RUNNING
    time.sleep(2.5)  # connected for a grace period, and still no beat: now it fails
    watcher.sweep()
    assert study.trials[orphan.number].state == TrialState.FAIL


def test_no_proxy_at_the_url_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "tlopt", "study", "list", "--storage", f"grpc://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tlopt storage proxy" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# --- S3-compatible artifact store ------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on a free port, with boto3 pointed at it through the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "tlopt-test",
        "AWS_SECRET_ACCESS_KEY": "tlopt-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket="tlopt-artifacts")
    try:
        yield endpoint
    finally:
        server.stop()


def _objects(prefix: str) -> list[str]:
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket="tlopt-artifacts", Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_trials_checkpoint_to_an_s3_bucket_and_export_reads_it(
    s3: str, sqlite_storage_url: str, tmp_path: Path
) -> None:
    config = load_config(_with_artifacts(tmp_path, "s3://tlopt-artifacts/team/study1", 3))
    studies.create(config, "head", sqlite_storage_url)
    work("svc/head", sqlite_storage_url, n_trials=1)
    heads = _objects("team/study1/")
    assert heads, "the head trial saved nothing in the bucket"
    studies.create(config, "freeze1", sqlite_storage_url)  # downloads the best head from S3
    summary = work("svc/freeze1", sqlite_storage_url, n_trials=2)
    assert summary.complete == 2
    study = optuna.load_study(study_name="svc/freeze1", storage=sqlite_storage_url)
    for t in study.trials:  # checkpoints were written per epoch, then removed when finished
        assert not t.user_attrs.get("tlopt.checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "tlopt", "export-best", "--study", "svc/freeze1"]
        + ["--storage", sqlite_storage_url, "--out", str(tmp_path / "export")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "export" / "model" / "model.safetensors").is_file()


def _with_artifacts(tmp_path: Path, artifacts: str, epochs: int) -> Path:
    path = tmp_path / "svc.toml"
    path.write_text(
        CONFIG.format(n_trials=2, epochs=epochs).replace(
            "[storage]\n", f'[storage]\nartifacts = "{artifacts}"\n'
        )
    )
    return path


def test_a_missing_bucket_is_one_line_before_the_study_exists(
    s3: str, sqlite_storage_url: str, tmp_path: Path
) -> None:
    path = _with_artifacts(tmp_path, "s3://no-such-bucket/x", 1)
    result = subprocess.run(
        [sys.executable, "-m", "tlopt", "study", "create", "--config", str(path)]
        + ["--stage", "head", "--storage", sqlite_storage_url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://no-such-bucket/x" in lines[0], result.stderr
    assert "NoSuchBucket" in lines[0] or "does not exist" in lines[0], lines[0]
    assert "tlopt-test-secret" not in result.stderr
    assert studies.list_studies(sqlite_storage_url) == []
