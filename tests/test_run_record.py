"""A run is what its folder and its studies hold: a rerun, a kill, a Ctrl-C anywhere and the run's
own study file decide from the stored record, and the export never gets worse."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from tests.conftest import kill_group
from tests.test_tune_command import FLAGS, shapes_folder, trials, tune_in_process
from tlopt.errors import TloptError
from tlopt.export.bundle import FILES, recover
from tlopt.run import Placement, build_config, write_study_file
from tlopt.run.placement import threads_now
from tlopt.run.record import Clock, RunRecord

TINY = FLAGS[:-4]  # the tiny network at 32 px, without --trials and --epochs


def _best_over_storage(run: Path) -> tuple[str, float]:
    """The stage and value of the best complete trial over every study of the run."""
    url = f"sqlite:///{run / 'studies.db'}"
    best: tuple[str, float] | None = None
    for summary in optuna.get_all_study_summaries(url):
        done = optuna.load_study(study_name=summary.study_name, storage=url).get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
        )
        for t in done:
            if t.value is not None and (best is None or t.value < best[1]):
                best = (summary.study_name, t.value)
    assert best is not None
    return best


@pytest.mark.slow
def test_a_rerun_of_some_stages_exports_the_best_over_every_stage_of_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun that runs one stage still weighs the others the run holds: the export is the
    best complete trial over all of them (it was the best of the stages run now), and a study
    deleted and made again does not pass its new trial 0 for the old export's trial 0."""
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    base = [str(data), "--out", str(run), *TINY, "--epochs", "2"]
    code, _, err = tune_in_process([*base, "--trials", "2", "--stages", "head,freeze1"],
                                   capsys, monkeypatch)  # fmt: skip
    assert code == 0, err
    study, _ = _best_over_storage(run)
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["study"] == study and manifest["identity"]["trial_id"] is not None

    # Rerun the stage that does not hold the best, with one more trial: the best stays.
    other = "freeze1" if study.endswith("/head") else "head"
    code, out, err = tune_in_process([*base, "--trials", "3", "--stages", other, "--json"],
                                     capsys, monkeypatch)  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    best_study, best_value = _best_over_storage(run)
    assert summary["exported"]["study"] == best_study
    assert summary["exported"]["value"] == pytest.approx(best_value)
    assert {s["stage"] for s in summary["stages"]} == {"head", "freeze1"}
    if best_study == study:  # the new trial did not beat it: the same export, kept
        assert summary["exported"]["kept"] is True
        again = json.loads((run / "export" / "manifest.json").read_text())
        assert again["identity"] == manifest["identity"]

    # The exported study deleted and made again: its new trials are not the exported one.
    url = f"sqlite:///{run / 'studies.db'}"
    exported = json.loads((run / "export" / "manifest.json").read_text())
    for name in ("shapes/freeze1", "shapes/head"):
        optuna.delete_study(study_name=name, storage=url)
    code, out, err = tune_in_process([*base, "--trials", "1", "--stages", "head", "--json"],
                                     capsys, monkeypatch)  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["exported"]["kept"] is False
    new = json.loads((run / "export" / "manifest.json").read_text())
    assert new["identity"] != exported["identity"]
    head = optuna.load_study(study_name="shapes/head", storage=url)
    assert new["identity"]["trial_id"] == head.best_trial._trial_id


def test_the_runs_own_study_file_leaves_the_epochs_to_the_budget_as_the_folder_run_did(
    tmp_path: Path,
) -> None:
    """What the user set is read from the file's text: the study file a folder run writes,
    given back with --config --time, lets the budget fit every stage's epochs, as the folder
    run did; a file that writes [search] epochs keeps them for every stage."""
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    flags = dict.fromkeys(("trials", "epochs", "backbone", "weights", "image_size"))
    folder = build_config(run, data, None, time="20m", **flags)
    assert folder.fixed == frozenset()
    run.mkdir()
    write_study_file(folder.config, run / "study.toml", epochs_set=False)
    again = build_config(run, None, run / "study.toml", time="20m", **flags)
    assert again.fixed == folder.fixed
    assert again.config == folder.config
    assert "epochs" not in (run / "study.toml").read_text().split("[search]")[1].split("[")[0]

    write_study_file(folder.config, run / "fixed.toml", epochs_set=True)
    assert build_config(run, None, run / "fixed.toml", time="20m", **flags).fixed == {"*"}
    (run / "stage.toml").write_text(
        (run / "study.toml").read_text() + "\n[stages.freeze1]\nepochs = [4]\n"
    )
    assert build_config(run, None, run / "stage.toml", time="20m", **flags).fixed == {"freeze1"}


def test_an_export_cut_between_its_renames_comes_back_whole(tmp_path: Path) -> None:
    """The export is written beside the old one and swapped in by two renames: a kill between
    them leaves the old folder aside, and the next look puts it back whole."""
    export, aside = tmp_path / "export", tmp_path / ".export.old"
    for name in FILES:  # the old export, set aside; the new one not in place yet
        (aside / name).parent.mkdir(parents=True, exist_ok=True)
        (aside / name).write_text(f"old {name}")
    assert not export.exists()
    recover(export)
    assert all((export / name).read_text() == f"old {name}" for name in FILES)
    assert not (tmp_path / ".export.old").exists()


def test_the_clock_charges_a_rerun_what_the_record_says_was_spent(tmp_path: Path) -> None:
    record = RunRecord(tmp_path)
    clock = Clock(1200.0, record, began=time.monotonic() - 300)
    clock.saving = True
    clock.save()
    again = Clock(1200.0, RunRecord.read(tmp_path))
    assert 299 <= again.before <= 310 and 890 <= again.left() <= 901
    assert Clock(1800.0, RunRecord.read(tmp_path)).before == 0  # another budget: afresh
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "run.json"]
    assert leftovers == []  # the atomic write leaves no temporary file


def test_several_worker_processes_are_planned_at_one_workers_threads() -> None:
    """--processes 2 on the CPU: the plan is timed at the threads each worker then gets."""
    from tlopt.tune.supervisor import available_cores

    before = torch.get_num_threads()
    try:
        placed = threads_now(Placement(processes=2))
        assert placed.threads == max(1, available_cores() // 2)
        assert torch.get_num_threads() == placed.threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_a_killed_run_is_charged_its_time_and_the_rerun_reads_its_plan(tmp_path: Path) -> None:
    """SIGKILL once a trial is told: run.json holds the time spent so far (it is written after
    each finished trial), and the same command spends only what is left and measures no plan
    again."""
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    args = [str(data), "--out", str(run), *TINY, "--time", "3m", "--stages", "head"]
    args += ["--heads-at-once", "1"]
    command = [sys.executable, "-m", "tlopt", "tune", *args]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    seen: list[str] = []
    began = time.monotonic()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(("trial 1 complete", "trial 1 pruned")):
                time.sleep(1.0)  # the record is written right after the trial's artifacts
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    lived = time.monotonic() - began
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    spent = json.loads((run / "run.json").read_text())["time"]["spent"]
    assert 0 < spent <= lived + 1, (spent, lived)
    done = [t for t in trials(run)["shapes/head"] if t[1] in ("COMPLETE", "PRUNED")]
    assert len(done) >= 2
    # It holds at least the time from the first trial's start to trial 1's end, less the tell
    # (the record is written as each trial ends, before it is told): not a guess of the machine.
    head = optuna.load_study(study_name="shapes/head", storage=f"sqlite:///{run / 'studies.db'}")
    first, second = (t for t in head.trials if t.number in (0, 1))
    assert second.datetime_complete is not None
    assert spent >= (second.datetime_start - first.datetime_start).total_seconds(), spent

    rerun = subprocess.run(
        [*command, "--plan-only"], capture_output=True, text=True, timeout=300, check=False
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "plan: as measured by this run before" in rerun.stdout
    before = re.search(r"([0-9.]+) min spent before the stages", rerun.stdout)
    assert before is not None and float(before.group(1)) >= round(spent / 60, 1), rerun.stdout


@pytest.mark.slow
def test_sigterm_during_the_size_probe_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """The stop covers the whole command: SIGTERM while the size probe runs (before any study
    exists) ends with one line and exit 130, no traceback."""
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    args = [str(data), "--out", str(run), "--backbone", "test_efficientnet", "--weights", "none"]
    command = [sys.executable, "-m", "tlopt", "tune", *args, "--image-size", "auto"]
    command += ["--trials", "2", "--epochs", "2"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("size probe:"):
                os.killpg(proc.pid, signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped before" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


OLD = Path(__file__).parent / "fixtures" / "old_rules_snapshot.json"


def test_a_study_made_by_the_old_rules_is_read_and_resumed_by_them(tmp_path: Path) -> None:
    """The fixture is a snapshot written by tlopt before presence (every [search] field held;
    a fine-tuning stage took warm-up 1 and layer decay 0.7 where [search] equalled the default,
    a tenth of the rate, the rate as written at every batch size), with the spaces that tlopt
    gave it. Read now it gives the same spaces, and a run whose studies hold it resumes."""
    from dataclasses import asdict

    from tlopt.config import StudyConfig, load_config
    from tlopt.run.held import Held, adopt_rules, check_studies
    from tlopt.tune.study import snapshot

    old = json.loads(OLD.read_text())
    config = StudyConfig.from_dict(old["snapshot"])
    assert config.rules == 1
    for stage, then in old["space_for"].items():
        now = asdict(config.space_for(stage))
        for key, value in then.items():
            got = list(now[key]) if isinstance(now[key], tuple) else now[key]
            assert got == value, (stage, key)
        assert now["lr_batch_size"] == 0  # the field came later: the rate as written
    assert snapshot(config) == old["snapshot"] | {"rules": 1}

    # A run whose head study holds the old snapshot: its study file, read now, resumes it.
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name=f"{config.name}/head", storage=url)
    study.set_user_attr("tlopt.config", old["snapshot"])
    (tmp_path / "plain.toml").write_text(old["study_file"])
    current = load_config(tmp_path / "plain.toml")
    held = Held(config.name, url)
    with pytest.raises(TloptError):  # by today's rules it is another config
        check_studies(current, ["head", "freeze1"], held)
    resumed = adopt_rules(current, ["head", "freeze1"], held)
    check_studies(resumed, ["head", "freeze1"], held)
    assert resumed.space_for("freeze1") == config.space_for("freeze1")


def test_a_process_opens_the_same_data_once_until_a_file_changes(tmp_path: Path) -> None:
    """tune's checks, probe, plan and workers share one opened folder (each open hashed every
    file), and a changed file is seen."""
    from tlopt.config import DataConfig, StudyConfig
    from tlopt.tune.context import open_config_source

    data = shapes_folder(tmp_path / "shapes")
    config = StudyConfig("shapes", data=DataConfig(source="folder", path=str(data)))
    first = open_config_source(config)
    assert open_config_source(config) is first
    changed = data / "disc" / "0.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    again = open_config_source(config)
    assert again is not first and again.fingerprint == first.fingerprint
