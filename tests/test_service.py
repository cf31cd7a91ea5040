"""Service at scale: many workers, killed workers, a restarted database, SIGTERM.

These run real worker processes against the real PostgreSQL server (and SQLite), with a tiny
model so that each trial takes about a second.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import TINY_DATA_MODEL
from tlopt.config import load_config
from tlopt.tune import study as studies
from tlopt.tune.budget import next_trials as _next_trials
from tlopt.tune.resilience import unbeaten_trials
from tlopt.tune.sampling import make_sampler
from tlopt.tune.storage import open_storage
from tlopt.tune.worker import work

pytestmark = pytest.mark.slow

CONFIG = (
    """
name = "svc"
seed = 1
n_trials = {n_trials}
"""
    + TINY_DATA_MODEL
    + """[search]
batch_size = [32, 64]
epochs = [{epochs}]
decay = ["constant", "exponential"]
lr = {{low = 1e-3, high = 3e-3, log = true}}  # continuous: budgets of 40 never use it up
optimizer = ["adam"]
[pruner]
type = "nop"
[storage]
heartbeat_interval = 1
grace_period = 4
"""
)


def make_config(tmp_path: Path, n_trials: int, epochs: int, grace: int = 4) -> Path:
    """``grace``: seconds without a heartbeat before another worker fails a trial as stale."""
    path = tmp_path / "svc.toml"
    text = CONFIG.format(n_trials=n_trials, epochs=epochs)
    path.write_text(text.replace("grace_period = 4", f"grace_period = {grace}"))
    return path


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _kill_leftover_workers() -> Iterator[None]:
    """Whatever a test ends with (a failed wait, a timeout), no worker it started survives it."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and every slot it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)


def start_worker(study: str, url: str, *args: str) -> subprocess.Popen[str]:
    """A `tlopt worker` in a process group of its own (see ``finish``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlopt", "worker", "--study", study, "--storage", url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    """The output of a worker started by ``start_worker`` once it exits.

    On timeout the whole process group is killed (the supervisor and every slot it started),
    so that a hanging study fails its test instead of outliving it.
    """
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"worker timed out after {timeout:.0f} s:\n{output[-3000:]}") from None
    return output


def states(study_name: str, url: str) -> dict[TrialState, int]:
    study = optuna.load_study(study_name=study_name, storage=url)
    counts: dict[TrialState, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] = counts.get(t.state, 0) + 1
    return counts


def finished(counts: dict[TrialState, int]) -> int:
    return counts.get(TrialState.COMPLETE, 0) + counts.get(TrialState.PRUNED, 0)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# Over a minute on 2 cores: eight worker processes each start torch and the study; the only
# test of one budget shared by more worker processes than cores, on PostgreSQL.
@pytest.mark.postgres
def test_eight_workers_share_a_budget_of_forty(pg_storage_url: str, tmp_path: Path) -> None:
    # Eight processes on two cores: a 4 s grace period was once passed by a live trial's
    # heartbeat on a loaded machine (its trial failed as stale and ran again); this test is
    # about sharing the budget, the stale checks have theirs (test_faults).
    config = make_config(tmp_path, 40, 1, grace=30)
    studies.create(load_config(config), "head", pg_storage_url)
    proc = start_worker("svc/head", pg_storage_url, "--processes", "8")
    output = finish(proc, 900)
    assert proc.returncode == 0, output[-3000:]
    counts = states("svc/head", pg_storage_url)
    assert finished(counts) == 40, counts
    assert counts.get(TrialState.RUNNING, 0) == 0 and counts.get(TrialState.FAIL, 0) == 0
    assert output.count("budget 40 finished trials") == 8
    for bad in ("Traceback", "error", "Error"):
        assert bad not in output, output[-3000:]


def two_epochs_checkpointed(name: str, url: str) -> bool:
    """Whether a running trial of ``name`` has reported 2 epochs and saved a checkpoint."""
    study = optuna.load_study(study_name=name, storage=url)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return any(
        len(t.intermediate_values) >= 2 and t.user_attrs.get("tlopt.checkpoint") for t in running
    )


def _fine_tuning_study(url: str, tmp_path: Path, n_trials: int, epochs: int, grace: int = 4) -> str:
    config = load_config(make_config(tmp_path, n_trials, epochs, grace))
    studies.create(config, "head", url)
    work("svc/head", url, n_trials=1)
    studies.create(config, "freeze1", url)
    return "svc/freeze1"


def test_sigkill_mid_trial_resumes_from_its_checkpoint(storage_url: str, tmp_path: Path) -> None:
    # 6 epochs: killed after 2, the trial has 4 left, seconds more than the poll takes.
    name = _fine_tuning_study(storage_url, tmp_path, n_trials=2, epochs=6)
    victim = start_worker(name, storage_url)
    wait_until(
        lambda: two_epochs_checkpointed(name, storage_url),
        300,
        "a running trial with 2 checkpointed epochs",
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    study = optuna.load_study(study_name=name, storage=storage_url)
    killed = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0]
    epochs_done = len(killed.intermediate_values)

    rescuer = start_worker(name, storage_url)
    output = finish(rescuer, 600)
    assert rescuer.returncode == 0, output[-3000:]
    study = optuna.load_study(study_name=name, storage=storage_url)
    assert study.trials[killed.number].state == TrialState.FAIL  # failed after the grace period
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == killed.params
    epochs = [h["epoch"] for h in retry[0].user_attrs["history"]]
    assert epochs == list(range(7)), epochs  # epoch 0 (the head it starts from), none repeated
    # Epochs report to the pruner before they save their checkpoint, so the kill may land
    # between the two: the retry resumes after the last saved epoch, at most the last reported.
    resumed = re.search(r"resumes after epoch (\d+)", output)
    assert resumed and 1 <= int(resumed.group(1)) <= epochs_done, output[-3000:]
    assert finished(states(name, storage_url)) == 2
    assert not retry[0].user_attrs.get("tlopt.checkpoint")  # cleaned up when finished


# About a minute on 2 cores: four worker processes, 16 trials, a restart while they run; the
# only test that workers ride out a PostgreSQL restart (no slot dies, every trial finishes).
@pytest.mark.postgres
def test_postgres_restart_while_four_workers_run(
    pg_storage_url: str, tmp_path: Path, restart_postgres: Callable[[], None]
) -> None:
    studies.create(load_config(make_config(tmp_path, 16, 2)), "head", pg_storage_url)
    proc = start_worker("svc/head", pg_storage_url, "--processes", "4")
    wait_until(lambda: finished(states("svc/head", pg_storage_url)) >= 2, 300, "2 trials")
    restart_postgres()
    output = finish(proc, 900)
    assert proc.returncode == 0, output[-3000:]
    counts = states("svc/head", pg_storage_url)
    assert finished(counts) == 16, counts
    assert counts.get(TrialState.RUNNING, 0) == 0
    assert "restarting" not in output  # no worker process died


# About a minute on 2 cores: four worker processes; the only test of concurrent workers on
# one SQLite file (its locking: no "database is locked").
def test_four_workers_on_one_sqlite_file(sqlite_storage_url: str, tmp_path: Path) -> None:
    studies.create(load_config(make_config(tmp_path, 16, 1)), "head", sqlite_storage_url)
    proc = start_worker("svc/head", sqlite_storage_url, "--processes", "4")
    output = finish(proc, 900)
    assert proc.returncode == 0, output[-3000:]
    assert "database is locked" not in output
    assert finished(states("svc/head", sqlite_storage_url)) == 16


def test_sigterm_stops_cleanly_and_the_next_worker_retries(
    sqlite_storage_url: str, tmp_path: Path
) -> None:
    name = _fine_tuning_study(sqlite_storage_url, tmp_path, n_trials=2, epochs=6)
    proc = start_worker(name, sqlite_storage_url, "--processes", "2")
    wait_until(
        lambda: states(name, sqlite_storage_url).get(TrialState.RUNNING, 0) >= 1, 300, "a trial"
    )
    time.sleep(1.0)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = finish(proc, 60)
    assert time.monotonic() - began < 30  # well inside the grace period
    counts = states(name, sqlite_storage_url)
    assert counts.get(TrialState.RUNNING, 0) == 0, counts
    assert counts.get(TrialState.WAITING, 0) >= 1  # the interrupted trials, re-queued
    assert "Traceback" not in output
    work(name, sqlite_storage_url)
    counts = states(name, sqlite_storage_url)
    assert finished(counts) == 2 and counts.get(TrialState.WAITING, 0) == 0


def test_gpu_slots_are_pinned_per_process() -> None:
    from tlopt.errors import TloptError
    from tlopt.tune.supervisor import parse_gpus, slot_devices

    assert slot_devices(["0", "1"], per_gpu=2, processes=1) == ["0", "0", "1", "1"]
    assert slot_devices(["0", "1"], per_gpu=1, processes=1, visible="2,3") == ["2", "3"]
    assert slot_devices([], per_gpu=2, processes=3) == [None, None, None]
    with pytest.raises(TloptError, match="only 2 GPUs are visible"):
        slot_devices(["2"], per_gpu=1, processes=1, visible="4,5")
    assert parse_gpus("0, 1") == ["0", "1"] and parse_gpus(None) == []
    with pytest.raises(TloptError, match="comma-separated"):
        parse_gpus("first")


def test_per_gpu_auto_sizes_slots_from_memory() -> None:
    """The sizing rule; the probe itself needs a CUDA device (see the README's GPU notes)."""
    from tlopt.errors import TloptError
    from tlopt.tune.placement import CONTEXT_BYTES, per_gpu_from_memory, probe

    gib = 2**30
    assert per_gpu_from_memory(80 * gib, 6 * gib) == 8  # capped
    assert per_gpu_from_memory(80 * gib, 20 * gib) == 3  # 72 GiB usable / 20
    assert per_gpu_from_memory(10 * gib, 40 * gib) == 1  # always at least one
    assert CONTEXT_BYTES > 0
    if not __import__("torch").cuda.is_available():
        with pytest.raises(TloptError, match="needs a CUDA device"):
            probe("any/head")
    for args, needle in (
        (["--per-gpu", "auto"], "pass --gpus too"),
        (["--per-gpu", "two"], "'auto'"),
        (["--per-gpu", "0"], "'auto'"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "tlopt", "worker", "--study", "x/head", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and needle in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_supervisor_restarts_a_slot_whose_process_dies(
    sqlite_storage_url: str, tmp_path: Path
) -> None:
    name = _fine_tuning_study(sqlite_storage_url, tmp_path, n_trials=3, epochs=4)
    proc = start_worker(name, sqlite_storage_url, "--processes", "2")
    wait_until(
        lambda: states(name, sqlite_storage_url).get(TrialState.RUNNING, 0) >= 1, 300, "a trial"
    )
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    victim = int(children.stdout.split()[0])
    os.kill(victim, signal.SIGKILL)
    output = finish(proc, 600)
    assert proc.returncode == 0, output[-3000:]
    assert "died with -9; restarting" in output
    counts = states(name, sqlite_storage_url)
    assert finished(counts) == 3 and counts.get(TrialState.RUNNING, 0) == 0, counts


def test_a_trial_beats_as_soon_as_it_is_asked_for(storage_url: str, tmp_path: Path) -> None:
    """Asked under the budget lock, a trial has its heartbeat before the lock is released."""
    config = load_config(make_config(tmp_path, 4, 1))
    studies.create(config, "head", storage_url)
    storage = open_storage(storage_url, 1, 4)
    study = optuna.load_study(study_name="svc/head", storage=storage, sampler=make_sampler(0))
    trials, done = _next_trials(study, storage, "svc/head", 4, 3, 1)
    assert len(trials) == 3 and not done
    assert isinstance(storage, optuna.storages.RDBStorage)
    study_id = storage.get_study_id_from_name("svc/head")
    assert unbeaten_trials(storage, study_id) == []


def test_a_worker_dead_before_its_first_beat_leaves_a_trial_that_is_retried(
    storage_url: str, tmp_path: Path
) -> None:
    """A worker killed between `ask` and its first heartbeat (a segfault, the OOM killer).

    Its trial is RUNNING without a heartbeat, which Optuna's stale check never fails; the
    workers that wait for the running trials used to wait for ever (issue 13).
    """
    studies.create(load_config(make_config(tmp_path, 2, 1)), "head", storage_url)
    # The dead worker's trial, asked as a worker asks, but without any heartbeat.
    orphan = optuna.load_study(study_name="svc/head", storage=storage_url).ask()
    began = time.monotonic()
    summary = work("svc/head", storage_url, timeout=60)
    assert time.monotonic() - began < 50, "the worker waited for the dead worker's trial"
    assert summary.complete + summary.pruned == 2
    study = optuna.load_study(study_name="svc/head", storage=storage_url)
    assert study.trials[orphan.number].state == TrialState.FAIL
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    counts = states("svc/head", storage_url)
    assert finished(counts) == 2 and counts.get(TrialState.RUNNING, 0) == 0, counts
