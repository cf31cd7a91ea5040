"""Workers: one seed, one study; distinct points for trials that run together; CPU threads per
slot; a device that is not there is one line.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
import torch
from optuna.trial import TrialState

from tests.conftest import TINY_DATA_MODEL
from tlopt import devices
from tlopt.config import load_config
from tlopt.errors import TloptError
from tlopt.tune import budget, sampling, supervisor
from tlopt.tune import study as studies
from tlopt.tune.storage import open_storage
from tlopt.tune.worker import work

SPACE = """[search]
batch_size = [32, 64]
epochs = [1]
decay = ["constant", "exponential"]
lr = [1e-3, 3e-3]
optimizer = ["adam"]
[pruner]
type = "nop"
"""


def _config(tmp_path: Path, n_trials: int, search: str = SPACE) -> Path:
    path = tmp_path / "sampling.toml"
    path.write_text(f'name = "smp"\nseed = 5\nn_trials = {n_trials}\n' + TINY_DATA_MODEL + search)
    return path


def _asker(url: str, tmp_path: Path, n_trials: int, search: str = SPACE) -> Any:
    """(study, a function asking for k trials as a worker does) on a new head study."""
    config = load_config(_config(tmp_path, n_trials, search))
    studies.create(config, "head", url)
    storage = open_storage(url, 1, 4)
    study = optuna.load_study(
        study_name="smp/head", storage=storage, sampler=sampling.make_sampler(config.seed)
    )
    propose = functools.partial(sampling.propose, config.space_for("head"), "head")

    def ask(k: int) -> list[optuna.Trial]:
        trials, done = budget.next_trials(
            study, storage, "smp/head", n_trials, k, config.storage.heartbeat_interval, propose
        )
        assert not done
        return trials

    return study, ask


def test_trials_asked_together_are_distinct_points(sqlite_storage_url: str, tmp_path: Path) -> None:
    """8 heads asked at once in a space of 8 points: 8 points (random draws repeat 99.8%)."""
    study, ask = _asker(sqlite_storage_url, tmp_path, 16)
    trials = ask(8)
    assert len(trials) == 8
    points = {tuple(sorted(t.params.items())) for t in trials}
    assert len(points) == 8, [t.params for t in trials]
    # Stored at once, under the lock: other workers see them (and TPE's constant liar too).
    stored = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert [t.params for t in stored] == [t.params for t in trials]


def test_a_point_a_running_trial_holds_is_drawn_again(
    sqlite_storage_url: str, tmp_path: Path
) -> None:
    """The points of trials running elsewhere are avoided; queued trials keep their own."""
    study, ask = _asker(sqlite_storage_url, tmp_path, 16)
    first = ask(3)
    held = [dict(t.params) for t in first]
    free = [
        {"batch_size": b, "decay": d, "lr": lr}
        for b in (32, 64)
        for d in ("constant", "exponential")
        for lr in (1e-3, 3e-3)
    ]
    queued = next(p for p in free if p not in held)
    study.enqueue_trial(queued)
    second = ask(5)
    assert study.trials[second[0].number].system_attrs["fixed_params"] == queued
    points = [tuple(sorted(p.items())) for p in [*held, queued, *(t.params for t in second[1:])]]
    assert len(set(points)) == len(points) == 8, points


# 2 x 2 x 6 = 24 points, all categorical: TPE's usual space in tlopt.
CATEGORICAL = SPACE.replace("lr = [1e-3, 3e-3]", "lr = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]")


def _value(params: dict[str, Any]) -> float:
    """A loss with one best point (lr 3e-3, constant, bs 32), for TPE to home in on."""
    lr = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2].index(params["lr"])
    return abs(lr - 3) + (params["decay"] != "constant") + (params["batch_size"] != 32) / 2


def test_tpe_past_its_start_up_never_repeats_a_finished_point(
    sqlite_storage_url: str, tmp_path: Path
) -> None:
    """A categorical space past TPE's 10 random start-up trials: TPE proposes its best point
    again and again; every trial, one at a time and then four at once, gets a new one."""
    study, ask = _asker(sqlite_storage_url, tmp_path, 40, CATEGORICAL)
    for _ in range(16):
        (trial,) = ask(1)
        study.tell(trial, _value(trial.params))
    batch = ask(4)
    points = [sampling.point(t.params) for t in study.trials]
    assert len(batch) == 4 and len(points) == 20 and len(set(points)) == 20, points


def test_a_used_up_space_stops_the_study_and_says_so(
    sqlite_storage_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4 points, a budget of 6: the worker runs the 4 points once each and stops there."""
    from tlopt.tune.worker import work

    config = load_config(_config(tmp_path, 6, SPACE.replace("lr = [1e-3, 3e-3]", "lr = [1e-3]")))
    studies.create(config, "head", sqlite_storage_url)
    with caplog.at_level("INFO", logger="tlopt.worker"):
        summary = work("smp/head", sqlite_storage_url, heads_at_once=1)
    study = optuna.load_study(study_name="smp/head", storage=sqlite_storage_url)
    points = {sampling.point(t.params) for t in study.trials}
    assert summary.complete == len(study.trials) == len(points) == 4
    assert "the search space holds 4 points: the study stops after 4 finished trials, not 6" in (
        caplog.text
    )


def test_a_used_up_space_is_said_once_a_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The plan, the allotment, the checks and the worker each ask a stage's budget: the line
    is said the first time only, and a different answer is said again."""
    space = load_config(_config(tmp_path, 20)).space_for("head")  # 8 points
    with caplog.at_level("INFO", logger="tlopt.worker"):
        budgets = [sampling.stage_budget(20, space) for _ in range(5)]
        sampling.stage_budget(10, space)
    said = [r.getMessage() for r in caplog.records if "the search space holds" in r.getMessage()]
    assert budgets == [8] * 5
    assert said == [
        "the search space holds 8 points: the study stops after 8 finished trials, not 20 "
        "(no point runs twice)",
        "the search space holds 8 points: the study stops after 8 finished trials, not 10 "
        "(no point runs twice)",
    ], said


@pytest.mark.parametrize(
    ("search", "size"),
    [
        (SPACE, 8),
        (SPACE.replace("[pruner]", "flip = [true, false]\n[pruner]"), 16),
        (SPACE.replace("[pruner]", "flip = [true, false]\ncut = [1, 2, 3]\n[pruner]"), 48),
        (CATEGORICAL.replace("[pruner]", "dropout = [0.0, 0.2]\n"
         "[search.decay_params.exponential]\ngamma = [0.9, 0.95]\n[pruner]"), 2 * 6 * 2 * 3),
    ],
    ids=["plain", "flip", "flip-cut", "decay-params"],
)  # fmt: skip
def test_space_size_counts_every_searched_value(tmp_path: Path, search: str, size: int) -> None:
    """The size is the number of distinct points suggest draws: flips and cuts included."""
    from tlopt.tune.space import space_size

    space = load_config(_config(tmp_path, 1, search)).space_for("head")
    assert space_size(space) == size
    walked = {sampling.point(w.params) for w in sampling._points(space, "head")}
    assert len(walked) == size


def test_sampler_seed_is_the_study_seed_the_study_and_the_slot() -> None:
    seeds = {
        sampling.sampler_seed(s, slot, r, study)
        for s in (0, 1)
        for slot in (0, 1)
        for r in (0, 1)
        for study in ("run/freeze1", "run/freeze2")
    }
    assert len(seeds) == 16  # study seed, slot, restart and study each change it
    assert sampling.sampler_seed(7, 2, 1) == sampling.sampler_seed(7, 2, 1)  # and nothing else
    sampler = sampling.make_sampler(0)
    # Set, not left to Optuna's defaults (5.0 turned both on; 4.x had both off).
    assert sampler._constant_liar is True and sampler._multivariate is True


def _proposed(url: str) -> list[dict[str, Any]]:
    study = optuna.load_study(study_name="smp/head", storage=url)
    return [t.params for t in sorted(study.trials, key=lambda t: t.number)]


@pytest.mark.slow
def test_one_seed_one_study_two_single_worker_runs_propose_the_same(tmp_path: Path) -> None:
    """Two fresh runs of one study file by one worker each (two processes, two storages).

    14 trials: past TPE's 10 random start-up ones, so TPE's own proposals are compared too.
    """
    path = _config(
        tmp_path, 14, SPACE.replace("lr = [1e-3, 3e-3]", "lr = {low = 1e-4, high = 1e-2}")
    )
    runs = []
    for run in ("a", "b"):
        url = f"sqlite:///{tmp_path}/{run}.db"
        studies.create(load_config(path), "head", url)
        env = {k: v for k, v in os.environ.items() if k not in (sampling.SLOT_ENV, "TLOPT_STORAGE")}
        done = subprocess.run(
            [sys.executable, "-m", "tlopt", "worker", "--study", "smp/head", "--storage", url]
            + ["--heads-at-once", "2"],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(_proposed(url))
    assert len(runs[0]) == 14 and runs[0] == runs[1], runs


@pytest.mark.slow
def test_two_studies_of_one_seed_propose_different_points(tmp_path: Path) -> None:
    """freeze1 and freeze2 of one run share its seed: each study's sampler is its own, or the
    second stage would run the first one's points again."""
    url = f"sqlite:///{tmp_path}/runs.db"
    search = SPACE.replace("lr = [1e-3, 3e-3]", "lr = {low = 1e-4, high = 1e-2}")
    for name in ("smp", "smq"):
        path = tmp_path / f"{name}.toml"
        path.write_text(f'name = "{name}"\nseed = 5\nn_trials = 2\n' + TINY_DATA_MODEL + search)
        studies.create(load_config(path), "head", url)
        work(f"{name}/head", url)
    lrs = [
        [t.params["lr"] for t in optuna.load_study(study_name=f"{n}/head", storage=url).trials]
        for n in ("smp", "smq")
    ]
    assert len(lrs[0]) == len(lrs[1]) == 2 and not set(lrs[0]) & set(lrs[1]), lrs


# --- CPU threads per slot --------------------------------------------------------------------


def test_each_slot_gets_its_share_of_the_cores() -> None:
    assert supervisor.slot_threads(2, None, {}, cores=2) == 1
    assert supervisor.slot_threads(3, None, {}, cores=16) == 5
    assert supervisor.slot_threads(8, None, {}, cores=2) == 1  # at least one
    assert supervisor.slot_threads(1, None, {}, cores=12) == 12
    assert supervisor.slot_threads(4, None, {"OMP_NUM_THREADS": "3"}, cores=16) == 3  # respected
    assert supervisor.slot_threads(4, 6, {"OMP_NUM_THREADS": "3"}, cores=16) == 6  # --threads wins
    assert supervisor.slot_threads(4, None, {"OMP_NUM_THREADS": "x"}, cores=16) == 4  # invalid
    env = supervisor.slot_env({"PATH": "/bin"}, "sqlite:///s.db", None, 3, 1, 2)
    assert env == {
        "PATH": "/bin",
        "TLOPT_STORAGE": "sqlite:///s.db",
        "CUDA_VISIBLE_DEVICES": "",
        "TLOPT_WORKER_SLOT": "3",
        "TLOPT_WORKER_RESTARTS": "1",
        "OMP_NUM_THREADS": "2",
    }


def test_a_worker_on_the_cpu_runs_a_thread_per_idle_core_unless_told() -> None:
    """Measured on a shared 2-core machine: 1 thread ran every stage 2-4x faster than 2."""
    assert supervisor.idle_cores(2, 4.7) == 1  # that busy machine
    assert supervisor.idle_cores(2, 0.2) == 2  # idle: torch's pool of every core
    assert supervisor.idle_cores(16, 3.6) == 12 and supervisor.idle_cores(4, 9.0) == 1
    cores = supervisor.available_cores()
    got = supervisor.worker_threads(None, {}, "cpu")
    assert got is not None and 1 <= got <= cores
    assert supervisor.worker_threads(None, {}, "cuda") is None  # torch's default on a GPU
    assert supervisor.worker_threads(None, {"OMP_NUM_THREADS": "2"}, "cpu") == 2  # respected
    assert supervisor.worker_threads(3, {"OMP_NUM_THREADS": "2"}, "cpu") == 3  # --threads wins


def test_busy_cores_counts_work_now_not_the_minute_before() -> None:
    """A core spinning for the last second is busy; the 1-minute load average has barely
    moved by then (it lags by minutes: a run started right after another got one thread)."""
    quiet = supervisor.busy_cores(0.5)
    assert quiet is not None and 0.0 <= quiet <= (os.cpu_count() or 1) + 0.01
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        time.sleep(0.5)  # the spinner is up
        busy = supervisor.busy_cores(1.0)
    finally:
        os.killpg(spin.pid, signal.SIGKILL)
        spin.wait()
    assert busy is not None and busy >= 0.7  # the spinner's core, at least


def _spinner(cpu: int) -> subprocess.Popen[bytes]:
    """A process that keeps CPU ``cpu`` busy until it is killed."""
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def _busy_share(before: Any, after: Any, cpu: int) -> float:
    """How busy CPU ``cpu`` was between two ``psutil.cpu_times(percpu=True)``, 0..1."""
    fields = ("user", "nice", "system", "irq", "softirq")
    busy = sum(getattr(after[cpu], f) - getattr(before[cpu], f) for f in fields)
    total = sum(after[cpu]) - sum(before[cpu])
    return busy / total if total > 0 else 0.0


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pins processes to two CPUs (Linux, two cores or more)",
)
@pytest.mark.parametrize("spin_on", ["the other cpu", "this cpu"])
def test_busy_cores_judges_only_the_cpus_this_process_may_use(spin_on: str) -> None:
    """Pinned to one CPU (as a container's cpuset pins it), busy-ness is that CPU's.

    A spinner on the other CPU is not counted (the machine-wide count called one core of
    this process's one busy); a spinner on this CPU is. The machine is shared, so the CPU
    may be busy with others' work: the count is checked against that CPU's own times.
    """
    allowed = os.sched_getaffinity(0)
    mine, other = sorted(allowed)[:2]
    spin = _spinner(other if spin_on == "the other cpu" else mine)
    try:
        os.sched_setaffinity(0, {mine})
        time.sleep(0.5)  # the spinner is up
        before = psutil.cpu_times(percpu=True)
        busy = supervisor.busy_cores(1.0)
        after = psutil.cpu_times(percpu=True)
    finally:
        os.sched_setaffinity(0, allowed)
        os.killpg(spin.pid, signal.SIGKILL)
        spin.wait()
    assert busy is not None and 0.0 <= busy <= 1.0 + 0.01, busy
    if spin_on == "this cpu":
        assert busy >= 0.7, busy
    else:
        assert _busy_share(before, after, other) >= 0.7  # the spinner ran
        assert busy <= _busy_share(before, after, mine) + 0.3, busy


@pytest.mark.slow  # trains a head
def test_a_cpu_worker_on_a_busy_machine_sets_torch_to_one_thread(
    tmp_path: Path, sqlite_storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlopt.tune.worker import work

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = supervisor.available_cores()
    monkeypatch.setattr(supervisor, "busy_cores", lambda: cores + 1.0)
    studies.create(load_config(_config(tmp_path, 1)), "head", sqlite_storage_url)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default on 2 cores, whatever this machine has
    try:
        work("smp/head", sqlite_storage_url, device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class _Proc:
    """A worker process that exits with the given codes, one per poll."""

    def __init__(self, args: list[str], env: dict[str, str], codes: list[int | None]) -> None:
        self.args, self.env, self.codes = args, env, codes
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        return self.returncode

    def send_signal(self, _signum: int) -> None:
        pass


def test_supervisor_numbers_its_slots_and_shares_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three CPU slots on 6 cores: 2 threads each; a restarted slot keeps its number."""
    started: list[_Proc] = []

    def popen(args: list[str], env: dict[str, str]) -> _Proc:
        dies = env["TLOPT_WORKER_SLOT"] == "1" and env["TLOPT_WORKER_RESTARTS"] == "0"
        codes: list[int | None] = [None, -9] if dies else [None, None, None, None, 0]
        started.append(_Proc(args, env, codes))
        return started[-1]

    monkeypatch.setattr(supervisor.subprocess, "Popen", popen)
    monkeypatch.setattr(supervisor, "load", lambda *_args: None)
    monkeypatch.setattr(supervisor, "available_cores", lambda: 6)
    monkeypatch.setattr(supervisor.time, "sleep", lambda _s: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(sampling.SLOT_ENV, raising=False)
    assert supervisor.supervise("x/head", "sqlite:////tmp/x.db", None, None, [], processes=3) == 0
    slots = [(p.env["TLOPT_WORKER_SLOT"], p.env["TLOPT_WORKER_RESTARTS"]) for p in started]
    assert slots == [("0", "0"), ("1", "0"), ("2", "0"), ("1", "1")]
    assert {p.env["OMP_NUM_THREADS"] for p in started} == {"2"}
    assert all(p.args[-2:] == ["--device", "cpu"] for p in started)
    # A user's OMP_NUM_THREADS is respected; TLOPT_WORKER_SLOT sets the first slot's number.
    started.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv(sampling.SLOT_ENV, "10")
    supervisor.supervise("x/head", "sqlite:////tmp/x.db", None, None, [], processes=2)
    assert [(p.env["TLOPT_WORKER_SLOT"], p.env["OMP_NUM_THREADS"]) for p in started][:2] == [
        ("10", "4"),
        ("11", "4"),
    ]


# --- --device --------------------------------------------------------------------------------


def test_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.check_device("cpu") == "cpu" and devices.check_device(None) is None
    with pytest.raises(TloptError, match="unknown device"):
        devices.check_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "gpu", "cuda:1"):
        with pytest.raises(TloptError, match="no CUDA device is visible.*--device cpu"):
            devices.check_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.check_device("gpu") == "cuda" and devices.check_device("GPU:1") == "cuda:1"
    with pytest.raises(TloptError, match="only 2 CUDA devices"):
        devices.check_device("cuda:2")


@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_no_cuda_device_is_one_line_and_exit_2(device: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tlopt", "worker", "--study", "x/head", "--device", device],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --device {device}: no CUDA"), lines
    assert "--device cpu" in lines[0]
