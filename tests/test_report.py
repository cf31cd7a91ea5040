"""``tlopt report`` on real stage studies, and the curves and note each trial leaves behind.

The studies are tiny (``test_efficientnet`` with random weights on the built-in digits at
16 px): head, freeze1 and scratch, a few trials each, and an ``export-best`` of freeze1.
"""

from __future__ import annotations

import base64
import csv
import io
import re
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna_dashboard import get_note
from PIL import Image

from tests.conftest import TINY_DATA_MODEL, cli, shared_cache
from tlopt.config import load_config
from tlopt.export.bundle import export_best
from tlopt.report import write_report
from tlopt.report.build import _caveats
from tlopt.report.trial_artifacts import write_trial_artifacts
from tlopt.train.ledger import EpochRecord, TrainParams
from tlopt.tune import study as studies
from tlopt.tune.artifacts import artifact_store
from tlopt.tune.worker import work

STAGES = (
    """
name = "rep"
seed = 3
n_trials = 4
"""
    + TINY_DATA_MODEL
    + """[search]
batch_size = [32, 64]
epochs = [2, 3]
decay = ["constant", "exponential"]
lr = [3e-3]
optimizer = ["sgd"]
[stages.freeze1]
lr = [1e-3]
optimizer = ["adam"]
[stages.scratch]
lr = [1e-3]
optimizer = ["adam"]
[pruner]
type = "median"
n_startup_trials = 2
n_warmup_steps = 0
"""
)
SECTIONS = ("curves", "params", "history", "overfitting", "walltime")


@pytest.fixture(scope="module")
def stage_studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str], Path]:
    """head (4 trials), freeze1 and scratch (3 each) in one SQLite file; freeze1 exported."""
    root = tmp_path_factory.mktemp("stages")
    url = f"sqlite:///{root}/studies.db"
    config_path = root / "rep.toml"
    config_path.write_text(STAGES)
    config = load_config(config_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLOPT_CACHE", str(shared_cache(tmp_path_factory)))
        for stage, n in (("head", 4), ("freeze1", 3), ("scratch", 3)):
            studies.create(config, stage, url)
            # Two different first trials: the workers' samplers are seeded per process, and
            # the report's importance and slice plots need parameters that vary.
            queue = optuna.load_study(study_name=f"rep/{stage}", storage=url)
            queue.enqueue_trial({"batch_size": 32, "epochs": 2, "decay": "constant"})
            queue.enqueue_trial({"batch_size": 64, "epochs": 3, "decay": "exponential"})
            work(f"rep/{stage}", url, n_trials=n, on_trial_done=write_trial_artifacts)
        export_best("rep/freeze1", root / "export", url)
    return url, ["rep/head", "rep/freeze1", "rep/scratch"], root / "export"


@pytest.mark.slow
def test_report_has_every_section_image_and_the_stage_table(
    stage_studies: tuple[str, list[str], Path], tmp_path: Path
) -> None:
    url, names, export = stage_studies
    out = tmp_path / "report"
    args = ["report", "--storage", url, "--out", str(out), "--export", str(export)]
    for name in names:
        args += ["--study", name]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out / 'report.html'}"
    page = (out / "report.html").read_text()

    ids = ["stages", "export"] + [
        f"{slug}-{part}" for slug in ("rep-head", "rep-freeze1", "rep-scratch") for part in SECTIONS
    ]
    for sid in ids:
        assert f'<section id="{sid}">' in page, sid
    assert 'class="missing"' not in page, re.findall(r'class="missing">([^<]*)', page)

    images = re.findall(r'src="data:image/png;base64,([^"]+)"[^>]*data-file="([^"]+)"', page)
    # Per study: 3 curve figures, importance, slice, history, overfitting, wall time; then the
    # stage chart and the export's confusion matrix.
    assert len(images) == 3 * 8 + 2
    for data, name in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG") and (out / name).read_bytes() == png, name
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
        assert pixels.shape[1] >= 400 and pixels.std() > 10, f"{name} looks empty"
    assert sorted(p.name for p in out.glob("*.png")) == sorted(name for _, name in images)

    # The stage table says what the studies say.
    with open(out / "stages.csv") as handle:
        rows = {r["study"]: r for r in csv.DictReader(handle)}
    for name in names:
        study = optuna.load_study(study_name=name, storage=url)
        best = study.best_trial
        accuracy = best.user_attrs["val_accuracy"]
        assert float(rows[name]["best_val_loss"]) == study.best_value
        assert float(rows[name]["best_val_accuracy"]) == accuracy
        assert int(rows[name]["best_trial"]) == best.number
        row = re.search(rf'<tr data-row="{re.escape(name)}">(.*?)</tr>', page)
        assert row is not None, name
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))
        assert cells[:2] == [name, name.split("/")[1]]
        assert cells[5:8] == [str(best.number), f"{study.best_value:.4f}", f"{accuracy:.2%}"]

    # The export: its confusion matrix and one row per class.
    for digit in range(10):
        assert f"<td>{digit}</td>" in page


def test_report_says_why_a_figure_is_missing(tmp_path: Path) -> None:
    """A plain Optuna study with one complete trial: no importances, a sentence instead."""
    url = f"sqlite:///{tmp_path}/plain.db"
    study = optuna.create_study(study_name="plain", storage=url)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr(
        "history",
        [
            {"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5, "val_loss": 1.2 / e}
            | {"val_accuracy": 0.4, "lr": 1e-3, "seconds": 0.1}
            for e in (1, 2)
        ],
    )
    study.tell(trial, 0.6)
    page = write_report(["plain"], tmp_path / "out", url).read_text()
    missing = re.findall(r'class="missing">([^<]*)', page)
    assert "The importance plot needs at least two complete trials." in missing
    assert "The comparison chart needs at least two studies with a complete trial." in missing
    assert not [m for m in missing if "could not be drawn" in m], missing  # none broke
    for figure in ("history", "walltime"):  # wall time: a study without tlopt's settings
        assert (tmp_path / "out" / f"plain-{figure}.png").stat().st_size > 0


def test_figure_warnings_go_to_the_caption_once_and_plot_noise_nowhere() -> None:
    def caught(category: type[Warning], text: str) -> warnings.WarningMessage:
        return warnings.WarningMessage(category(text), category, "optuna.py", 1)

    inaccurate = "Some regimes for parameter `lr` have less than 2 trials."
    notes = _caveats(
        [
            caught(UserWarning, inaccurate),
            caught(UserWarning, inaccurate),
            caught(UserWarning, "Attempting to set identical low and high xlims makes ..."),
            caught(optuna.exceptions.ExperimentalWarning, "plot_slice is experimental"),
        ]
    )
    assert notes == [f"Note: {inaccurate}"]


@pytest.mark.slow
def test_report_refuses_a_folder_that_is_not_an_export(
    stage_studies: tuple[str, list[str], Path], tmp_path: Path
) -> None:
    url, names, _ = stage_studies
    done = cli("report", "--storage", url, "--study", names[0], "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    done = cli(
        "report", "--storage", url, "--study", names[0], "--out", str(tmp_path / "o2"),
        "--export", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "export-best" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_every_complete_trial_has_its_curves_and_a_note(
    stage_studies: tuple[str, list[str], Path],
) -> None:
    url, names, _ = stage_studies
    for name in names:
        study = optuna.load_study(study_name=name, storage=url)
        for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            files = {a.filename for a in get_all_artifact_meta(trial, storage=study._storage)}
            assert f"curves-trial{trial.number}.png" in files, (name, trial.number, files)
            live = optuna.Trial(study, trial._trial_id)
            note = get_note(live)
            assert f"### Trial {trial.number}" in note and f"{trial.value:.4f}" in note


def test_trial_artifacts_are_cheap_and_never_fail_the_trial(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/t.db")
    ctx = SimpleNamespace(artifacts=artifact_store(tmp_path / "artifacts"), study_name="t")
    history = [EpochRecord(e, 1 / e, 0.5, 1.1 / e, 0.45, 1e-3, 0.2) for e in range(1, 51)]
    params = TrainParams(batch_size=16, epochs=50, decay="step", decay_params={"gamma": 0.1})
    times = []
    for _ in range(3):
        trial = study.ask()
        began = time.perf_counter()
        write_trial_artifacts(trial, ctx, history, params)  # type: ignore[arg-type]
        times.append(time.perf_counter() - began)
        study.tell(trial, 0.5)
    # A sanity bound, not a benchmark (about 0.15 s on an idle 2-core machine).
    assert min(times[1:]) < 3.0, times  # the first call pays for matplotlib's font cache
    assert len(list((tmp_path / "artifacts").iterdir())) == 3

    broken = SimpleNamespace(artifacts=None, study_name="t")  # uploading raises
    trial = study.ask()
    write_trial_artifacts(trial, broken, history, params)  # type: ignore[arg-type]
    study.tell(trial, 0.5)
    assert study.trials[-1].state == optuna.trial.TrialState.COMPLETE
