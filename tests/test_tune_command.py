"""``tlopt tune``: the stages, the export and the report in one command, resumed where it stops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from PIL import Image, ImageDraw

from tests.conftest import run_in_group
from tlopt import cli
from tlopt.config import StudyConfig, load_config
from tlopt.pipeline import write_study_file

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
def test_tune_runs_the_stages_exports_reports_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"

    # The head stage alone first: its study, the export of its best trial and the report.
    code, out, err = tune_in_process(
        [str(data), "--out", str(run), *FLAGS, "--stages", "head"], capsys, monkeypatch
    )
    assert code == 0, err
    assert "stage head: running 2 of 2 trials" in out
    assert "best stage by validation loss" in out and "same validation split" in out
    head = trials(run)["shapes/head"]
    assert len(head) == 2 and {state for _, state, _ in head} <= {"COMPLETE", "PRUNED"}

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
