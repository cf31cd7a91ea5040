"""``tlopt tune``: the stages, the export and the report in one command, resumed where it stops."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from PIL import Image, ImageDraw
from sqlalchemy.engine import make_url

from tests.conftest import run_in_group
from tlopt import cli
from tlopt.config import StudyConfig, load_config
from tlopt.run import build_config, write_study_file

# A tiny timm network from scratch at 32 px, 2 trials of 2 epochs per stage: seconds on a CPU.
FLAGS = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32"]
FLAGS += ["--trials", "2", "--epochs", "2"]


def shapes_folder(root: Path) -> Path:
    """3 classes x 12 small PNGs: a red disc, a green square, a blue triangle, placed at random."""
    rng = np.random.default_rng(0)
    for k, (name, colour) in enumerate(
        {"disc": (220, 40, 40), "square": (40, 200, 60), "triangle": (40, 60, 220)}.items()
    ):
        (root / name).mkdir(parents=True)
        for i in range(12):
            image = Image.new("RGB", (24, 24), tuple(int(c) for c in rng.integers(0, 60, 3)))
            x, y = (int(v) for v in rng.integers(0, 9, 2))
            draw = ImageDraw.Draw(image)
            if k == 0:
                draw.ellipse([x, y, x + 14, y + 14], fill=colour)
            elif k == 1:
                draw.rectangle([x, y, x + 14, y + 14], fill=colour)
            else:
                draw.polygon([(x, y + 14), (x + 14, y + 14), (x + 7, y)], fill=colour)
            image.save(root / name / f"{i}.png")
    return root


def tune_in_process(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """``tlopt tune ARGS`` through the CLI's entry point in this process: (exit code, out, err)."""
    monkeypatch.setattr(sys, "argv", ["tlopt", "tune", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def tune_subprocess(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``tlopt tune ARGS`` in its own process group, killed whole if it outlives ``timeout``."""
    return run_in_group([sys.executable, "-m", "tlopt", "tune", *args], timeout, "tlopt tune")


def trials(run: Path) -> dict[str, list[tuple[int, str, Any]]]:
    """Every trial in the run's storage, by study: (number, state, when it finished)."""
    url = f"sqlite:///{run / 'studies.db'}"
    return {
        s.study_name: [
            (t.number, t.state.name, t.datetime_complete)
            for t in optuna.load_study(study_name=s.study_name, storage=url).trials
        ]
        for s in optuna.get_all_study_summaries(url)
    }


def stored_config(run: Path) -> dict[str, Any]:
    """The run's study file as its studies store it: without the storage URL."""
    config = load_config(run / "study.toml").to_dict()
    return config | {"storage": config["storage"] | {"url": ""}}


@pytest.mark.slow  # CLI subprocesses (a worker, or one per bad input): the full tier
def test_tune_runs_the_stages_exports_reports_resumes_and_refuses_another_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"

    # The head stage alone first: its study, the export of its best trial and the report.
    args = [str(data), "--out", str(run), *FLAGS, "--stages", "head"]
    code, out, err = tune_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    assert "stage head: running 2 of 2 trials" in out
    assert "best stage by validation loss" in out and "same validation split" in out
    head = trials(run)["shapes/head"]
    assert len(head) == 2 and {state for _, state, _ in head} <= {"COMPLETE", "PRUNED"}

    # A rerun with another config is refused in one line and changes nothing.
    before, studies = _files(run), trials(run)
    for flag, value, key in (
        ("--image-size", "24", "data.image_size: 32 -> 24"),
        ("--backbone", "test_byobnet", 'model.backbone: "test_efficientnet" -> "test_byobnet"'),
    ):
        i = args.index(flag) + 1
        changed = [*args[:i], value, *args[i + 1 :]]
        line = _one_line(*tune_in_process(changed, capsys, monkeypatch), "another config", key)
        assert "--name NEW" in line  # the remedy: a run of another name
        assert _files(run) == before and trials(run) == studies

    # Then head and freeze1 (a user's process, --json): head runs nothing, freeze1 its budget.
    done = tune_subprocess(
        [str(data), "--out", str(run), *FLAGS, "--stages", "head,freeze1", "--json"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # stdout holds the JSON summary and nothing else
    assert [(s["stage"], s["ran"], s["finished"]) for s in summary["stages"]] == [
        ("head", 0, 2),
        ("freeze1", 2, 2),
    ]
    best = min(summary["stages"], key=lambda s: s["best_value"])
    assert summary["exported"]["stage"] == best["stage"]
    assert summary["exported"]["trial"] == best["best_trial"]
    assert summary["ran"] == 2 and not summary["nothing_to_do"]
    after = trials(run)
    assert after["shapes/head"] == head  # the head trials are those of the first run
    assert len(after["shapes/freeze1"]) == 2
    for path in ("study.toml", "export/metrics.json", "export/model/model.safetensors"):
        assert (run / path).is_file(), path
    assert Path(summary["report"]) == run / "report" / "report.html"
    assert Path(summary["report"]).is_file() and Path(summary["export"]) == run / "export"
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert (manifest["study"], manifest["trial"]) == (best["study"], best["best_trial"])
    # The study file is the config every stage's study holds, less the storage URL.
    stored = optuna.load_study(study_name="shapes/freeze1", storage=summary["storage"])
    assert stored_config(run) == stored.user_attrs["tlopt.config"]

    # The same command again runs no trial, keeps the export and says there is nothing to do.
    exported_at = (run / "export" / "manifest.json").stat().st_mtime_ns
    args = [str(data), "--out", str(run), *FLAGS, "--stages", "head,freeze1"]
    code, out, err = tune_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    assert "nothing to do" in out and "holds 2 of 2 finished trials: nothing to run" in out
    assert trials(run) == after
    assert (run / "export" / "manifest.json").stat().st_mtime_ns == exported_at

    # So does the study file it wrote, passed back with --config.
    args = ["--config", str(run / "study.toml"), "--out", str(run), "--stages", "head,freeze1"]
    code, out, err = tune_in_process([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["nothing_to_do"] is True
    assert trials(run) == after

    # A larger --trials resumes every stage up to it; the studies and the study file take it.
    more = [*FLAGS[:-4], "--trials", "3", "--epochs", "2", "--stages", "head,freeze1"]
    code, out, err = tune_in_process([str(data), "--out", str(run), *more], capsys, monkeypatch)
    assert code == 0, err
    assert "stage head: budget 2 -> 3 finished trials" in out
    assert "stage freeze1: running 1 of 3 trials" in out
    extended = trials(run)
    for name in ("shapes/head", "shapes/freeze1"):
        assert len(extended[name]) == 3 and extended[name][:2] == after[name]
        stored = optuna.load_study(study_name=name, storage=summary["storage"]).user_attrs
        assert stored["tlopt.config"] == stored_config(run)
        assert stored["tlopt.config"]["n_trials"] == 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing"], "does not exist"),
        (["flat"], "no class folders"),
        (["shapes", "--stages", "head,freez1"], "unknown stage 'freez1'"),
        (["shapes", "--stages", "freeze1"], "starts from the best head"),
        (["shapes", "--per-gpu", "two"], "--per-gpu two"),
        (["shapes", "--backbone", "resnet33"], "unknown backbone 'resnet33'"),
    ],
)
def test_tune_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    needle: str,
) -> None:
    (tmp_path / "flat").mkdir()  # images but no class folders
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "0.png")
    (tmp_path / "shapes" / "a").mkdir(parents=True)
    (tmp_path / "shapes" / "b").mkdir()
    for k, c in enumerate("ab"):
        for i in range(3):
            colour = (i * 80, k * 200, 0)
            Image.new("RGB", (8, 8), colour).save(tmp_path / "shapes" / c / f"{i}.png")
    run = tmp_path / "run"
    argv = [str(tmp_path / args[0]), "--out", str(run), *args[1:]]
    code, out, err = tune_in_process(argv, capsys, monkeypatch)
    assert code == 2 and out == "" and "Traceback" not in err
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], err
    assert not run.exists()  # nothing written on bad input


def test_study_file_loads_back_to_its_config(tmp_path: Path) -> None:
    config = StudyConfig.from_dict(
        {
            "name": "pets",
            "n_trials": 7,
            "data": {"source": "digits", "image_size": 16},
            "model": {"backbone": "test_efficientnet", "weights": "none", "freeze_modules": 40},
            "search": {
                "lr": {"low": 1e-5, "high": 1e-2, "log": True},
                "decay": ["step", "cosine"],
                "decay_params": {"step": {"step_size": [5, 10], "gamma": [0.1]}},
            },
            "stages": {"freeze1": {"lr": [3e-4], "batch_size": [16]}},
            "pruner": {"type": "percentile", "percentile": 25.0},
            "storage": {"url": "postgresql://me:secret@db.example/tlopt"},
        }
    )
    path = tmp_path / "study.toml"
    write_study_file(config, path)  # raises if the file does not load back to the config
    text = path.read_text()
    assert "secret" not in text and text.startswith("# The study file")
    assert "[stages.freeze1]" in text and "[search.decay_params.step]" in text


def test_a_folder_runs_head_searches_its_rate_and_dropout_and_fine_tuning_keeps_search(
    tmp_path: Path,
) -> None:
    """A folder at the defaults: [stages.head] widens the head's rate and dropout (its trials
    cost seconds on cached features); fine-tuning stages keep [search]'s, and a study file is
    taken as written."""
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    flags = dict.fromkeys(("trials", "epochs", "backbone", "weights", "image_size"))
    config = build_config(run, data, None, **flags).config
    head, freeze1 = config.space_for("head"), config.space_for("freeze1")
    assert (head.lr, head.dropout) == ((3e-4, 1e-3, 3e-3), (0.2, 0.5))
    assert freeze1.dropout == config.search.dropout == (0.2,)
    assert freeze1.lr == (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)  # a hundredth .. the whole of 1e-3
    run.mkdir()
    write_study_file(config, run / "study.toml")
    assert "[stages.head]" in (run / "study.toml").read_text()
    again = build_config(run, None, run / "study.toml", **flags).config
    assert again.space_for("head") == head
    demo = build_config(run, None, Path(__file__).parents[1] / "studies/demo.toml", **flags).config
    assert "head" not in demo.stages  # a study file's own [stages] only


def _files(run: Path) -> dict[str, bytes]:
    """Every file of the run folder but the SQLite database, by path: what a refusal keeps."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and not p.name.startswith("studies.db")
    }


def _one_line(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2 and out == "" and "Traceback" not in err, err[-2000:]
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]


@pytest.mark.slow
@pytest.mark.postgres
def test_a_run_whose_storage_holds_a_secret_resumes_there_or_refuses(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    pg_storage_url: str,
) -> None:
    """The password in the query (?password=): in no file, study attribute or output; the
    run's study file (its URL blanked) finds the studies through TLOPT_STORAGE or refuses."""
    parsed = make_url(pg_storage_url)
    password = str(parsed.password)
    url = parsed.set(password=None, query={"password": password})
    secret_url = url.render_as_string(hide_password=False)
    assert f"password={password}" in secret_url
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"

    args = [str(data), "--out", str(run), *FLAGS, "--stages", "head", "--storage", secret_url]
    code, out, err = tune_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    assert "password=***" in out and password not in out + err
    for path, content in _files(run).items():
        assert password.encode() not in content, path
    study = optuna.load_study(study_name="shapes/head", storage=secret_url)
    assert password not in json.dumps(study.user_attrs)
    text = (run / "study.toml").read_text()
    assert 'url = ""' in text and "TLOPT_STORAGE" in text and "password=***" in text
    before = _files(run)

    # The study file's own command, as its header says: the studies are elsewhere.
    resume = ["--config", str(run / "study.toml"), "--out", str(run), "--stages", "head"]
    line = _one_line(*tune_in_process(resume, capsys, monkeypatch), "TLOPT_STORAGE")
    assert "password=***" in line and password not in line
    assert not (run / "studies.db").exists() and _files(run) == before

    monkeypatch.setenv("TLOPT_STORAGE", secret_url)
    code, out, err = tune_in_process(resume, capsys, monkeypatch)
    assert code == 0, err
    assert "nothing to do" in out and password not in out + err
    assert not (run / "studies.db").exists()


@pytest.mark.slow
def test_a_run_stopped_mid_stage_resumes_where_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT once the first trial is told: the run exports the best trial so far and stops
    in one line (exit 130), and the same command runs only what the stage still lacks (4
    trials one at a time: some are left to run)."""
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    args = [str(data), "--out", str(run), *FLAGS[:-4], "--trials", "4", "--epochs", "3"]
    args += ["--stages", "head", "--heads-at-once", "1"]
    command = [sys.executable, "-m", "tlopt", "tune", *args]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(("trial 0 complete", "trial 0 pruned")):
                os.killpg(proc.pid, signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"tlopt tune ran past 120 s after SIGINT: {''.join(seen)[-2000:]}")
    err = "".join(seen) + rest
    assert proc.returncode == 130, err[-3000:]
    assert f"error: stopped: the best trial so far is exported to {run / 'export'}" in err
    assert "run again to resume" in err and "Traceback" not in err
    stopped = trials(run)["shapes/head"]
    done = [t for t in stopped if t[1] in ("COMPLETE", "PRUNED")]
    assert 1 <= len(done) < 4
    url = f"sqlite:///{run / 'studies.db'}"
    best = optuna.load_study(study_name="shapes/head", storage=url).best_trial.number
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert (manifest["study"], manifest["trial"]) == ("shapes/head", best)

    code, out, err = tune_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    assert f"stage head: running {4 - len(done)} of 4 trials" in out
    resumed = trials(run)["shapes/head"]
    assert sum(t[1] in ("COMPLETE", "PRUNED") for t in resumed) == 4
    assert all(t in resumed for t in done)  # the trials before the stop are kept as they were
    assert not [t for t in resumed if t[1] in ("RUNNING", "WAITING")]
    assert (run / "export" / "manifest.json").is_file()


@pytest.mark.slow
def test_tune_with_two_worker_processes(tmp_path: Path) -> None:
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    args = [str(data), "--out", str(run), *FLAGS, "--stages", "head", "--processes", "2"]
    done = tune_subprocess([*args, "--heads-at-once", "1", "--json"], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert [(s["stage"], s["ran"], s["finished"]) for s in summary["stages"]] == [("head", 2, 2)]
    workers = set(re.findall(r"worker (\d+) \(slot (\d+)\)", done.stderr))
    assert {slot for _, slot in workers} == {"0", "1"}, done.stderr[-3000:]
    assert (run / "export" / "manifest.json").is_file()
    assert not [t for t in trials(run)["shapes/head"] if t[1] not in ("COMPLETE", "PRUNED")]


@pytest.mark.slow
def test_a_better_head_found_by_a_rerun_is_where_new_fine_tuning_trials_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun with more head trials finds a better head: freeze1's new trials start from it,
    each trial records its head, and export-best replays a trial from the head it used."""
    from optuna.artifacts import download_artifact, upload_artifact
    from safetensors.torch import load_file, save_file

    from tlopt.export.bundle import export_best

    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    one = [*FLAGS[:-4], "--trials", "1", "--epochs", "2", "--stages", "head,freeze1"]
    code, _, err = tune_in_process([str(data), "--out", str(run), *one], capsys, monkeypatch)
    assert code == 0, err
    url = f"sqlite:///{run / 'studies.db'}"
    head = optuna.load_study(study_name="shapes/head", storage=url)
    first = head.trials[0]

    # The head trial a larger --trials could find, its value lower: a head that answers the
    # first class whatever it sees (a start that cannot be mistaken for trial 0's).
    store = head.user_attrs["tlopt.artifacts"]
    weights = tmp_path / "head.safetensors"
    artifacts = optuna.artifacts.FileSystemArtifactStore(store)
    download_artifact(
        artifact_store=artifacts,
        file_path=str(weights),
        artifact_id=first.user_attrs["tlopt.head_artifact"],
    )
    state = load_file(str(weights))
    bias = torch.full_like(state["bias"], -10.0)
    bias[0] = 10.0
    save_file({"weight": torch.zeros_like(state["weight"]), "bias": bias}, str(weights))
    artifact = upload_artifact(
        artifact_store=artifacts, file_path=str(weights), study_or_trial=head
    )
    head.add_trial(
        optuna.trial.create_trial(
            params=first.params,
            distributions=first.distributions,
            value=first.value - 1e-3,
            user_attrs={**first.user_attrs, "tlopt.head_artifact": artifact},
        )
    )

    two = [*FLAGS[:-4], "--trials", "2", "--epochs", "2", "--stages", "head,freeze1"]
    code, out, err = tune_in_process([str(data), "--out", str(run), *two], capsys, monkeypatch)
    assert code == 0, err
    assert "stage freeze1: the best head is now trial 1" in out and "not head trial 0" in out
    freeze1 = optuna.load_study(study_name="shapes/freeze1", storage=url)
    assert freeze1.user_attrs["tlopt.head"]["trial"] == 1
    assert freeze1.user_attrs["tlopt.first_head"]["trial"] == 0
    used = [t.user_attrs["tlopt.head"]["trial"] for t in freeze1.trials]
    assert used == [0, 1]  # each trial records the head it started from
    starts = [t.user_attrs["history"][0] for t in freeze1.trials]
    assert starts[0]["epoch"] == starts[1]["epoch"] == 0
    assert starts[1]["val_loss"] > 2 * starts[0]["val_loss"]  # the new head's start

    # export-best retrains freeze1's best trial from its own head (epoch 0 is that head).
    best = min(freeze1.trials, key=lambda t: t.value)
    export_best("shapes/freeze1", tmp_path / "export", url)
    replayed = json.loads((tmp_path / "export" / "history.json").read_text())
    assert replayed[0]["epoch"] == 0
    assert replayed[0]["val_loss"] == pytest.approx(
        best.user_attrs["history"][0]["val_loss"], rel=1e-3
    )
    # And the stage's row names the head its best trial started from.
    summary = json.loads((run / "summary.json").read_text())
    row = next(s for s in summary["stages"] if s["stage"] == "freeze1")
    assert row["head_trial"] == best.user_attrs["tlopt.head"]["trial"]
