"""Stage studies end to end on SQLite and on the real PostgreSQL server.

A tiny timm model (``test_efficientnet``, random weights) on the built-in digits at 16 px keeps
each trial under a second; the mechanics are the same as on a real backbone.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

import tlopt
from tests.conftest import TINY_DATA_MODEL, cli
from tlopt.config import load_config
from tlopt.errors import StudyError
from tlopt.export.bundle import FILES, export_best
from tlopt.train.data import ImageSet
from tlopt.train.descriptors import predict
from tlopt.tune import study as studies
from tlopt.tune.worker import work

TINY = (
    """
name = "tiny"
seed = 3
n_trials = 6
"""
    + TINY_DATA_MODEL
    + """[search]
batch_size = [32]
epochs = [4]
decay = ["constant", "exponential"]
lr = [3e-3, 9.0]
optimizer = ["sgd"]
momentum = [0.9, 0.8]
[stages.freeze1]
lr = [3e-3, 1e-7]
optimizer = ["adam"]
decay = ["constant"]
epochs = [3]
[pruner]
type = "median"
n_startup_trials = 1
n_warmup_steps = 0
"""
)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def finished(study: optuna.Study) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def test_stages_prune_chain_and_export(storage_url: str, tiny: Path, tmp_path: Path) -> None:
    config = load_config(tiny)
    plan = studies.create(config, "head", storage_url)
    assert plan.created and plan.name == "tiny/head" and len(plan.classes) == 10
    summary = work("tiny/head", storage_url)
    head = optuna.load_study(study_name="tiny/head", storage=storage_url)  # plain Optuna reads it
    assert finished(head) == 6 and summary.complete + summary.pruned == 6
    complete = [t for t in head.trials if t.state == TrialState.COMPLETE]
    for t in complete:  # the pruner saw one value per epoch; the objective is the best of them
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.value == pytest.approx(min(t.intermediate_values.values()))
        assert len(t.user_attrs["history"]) == 4 and "tlopt.head_artifact" in t.user_attrs

    studies.create(config, "freeze1", storage_url)
    attrs = optuna.load_study(study_name="tiny/freeze1", storage=storage_url).user_attrs
    assert attrs["tlopt.head"]["trial"] == studies.best_trial(head).number
    queue = optuna.load_study(study_name="tiny/freeze1", storage=storage_url)
    queue.enqueue_trial({"lr": 3e-3})  # a trial that learns, then one that cannot (lr 1e-7)
    queue.enqueue_trial({"lr": 1e-7})
    work("tiny/freeze1", storage_url, n_trials=3)
    freeze1 = optuna.load_study(study_name="tiny/freeze1", storage=storage_url)
    assert finished(freeze1) == 3
    pruned = [t for t in freeze1.trials if t.state == TrialState.PRUNED]
    assert pruned and pruned[0].params["lr"] == 1e-7
    # The median pruner saw per-epoch values: it stopped the trial before its last epoch.
    assert len(pruned[0].intermediate_values) < 3
    assert pruned[0].user_attrs["tlopt.prune_reason"].startswith("median pruner at epoch")

    out = tmp_path / "export"
    manifest = export_best("tiny/freeze1", out, storage_url)
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    best = studies.best_trial(freeze1)
    # Retrained with the study's seed through the same trainer: the same result on the CPU.
    assert manifest["retrained_value"] == pytest.approx(best.value, rel=1e-4)  # another process
    metrics = json.loads((out / "metrics.json").read_text())
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == metrics["count"] == attrs["tlopt.counts"]["test"]
    descriptors = np.load(out / "descriptors.npy")
    rows = (out / "descriptors.csv").read_text().splitlines()
    assert descriptors.shape[0] == len(rows) - 1 == 1797 and descriptors.dtype == np.float32
    assert np.isfinite(descriptors).all()

    # A reloaded model reproduces the exported metrics.
    model = tlopt.load_model(str(out))
    from tlopt.tune.context import StudyContext

    ctx = StudyContext.open(freeze1, "cpu")
    test = ctx.split("test")
    _, logits = predict(model, ImageSet(test.images, test.labels, ctx.mean, ctx.std))
    accuracy = float((logits.argmax(1) == test.labels.numpy()).mean())
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1e-9)
    again, _ = predict(
        model, ImageSet.from_arrays(np.asarray(ctx.images), ctx.labels, ctx.mean, ctx.std)
    )
    np.testing.assert_allclose(again, descriptors, rtol=1e-4, atol=1e-5)
    import timm

    plain = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True)
    assert isinstance(plain, torch.nn.Module)

    rows_list = studies.list_studies(storage_url)
    assert {r["name"] for r in rows_list} == {"tiny/head", "tiny/freeze1"}


@pytest.mark.slow
def test_two_worker_processes_share_one_budget(storage_url: str, tiny: Path) -> None:
    studies.create(load_config(tiny), "head", storage_url)
    done = cli(
        "worker",
        "--study",
        "tiny/head",
        "--storage",
        storage_url,
        "--processes",
        "2",
        "--n-trials",
        "5",
        env={"TLOPT_CACHE": os.environ["TLOPT_CACHE"]},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="tiny/head", storage=storage_url)
    assert finished(study) == 5
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert len({p for p in done.stderr.split() if p.isdigit()}) >= 1
    assert done.stderr.count("budget 5 finished trials") == 2  # two workers took part
    assert "Traceback" not in done.stderr


def test_same_name_other_config_is_refused(sqlite_storage_url: str, tiny: Path) -> None:
    studies.create(load_config(tiny), "head", sqlite_storage_url)
    changed = tiny.with_name("changed.toml")
    changed.write_text(TINY.replace("seed = 3", "seed = 4").replace('name = "tiny"', ""))
    cfg = load_config(changed)
    with pytest.raises(StudyError, match="seed: 3 -> 4.*--name"):
        studies.create(cfg, "head", sqlite_storage_url, name="tiny/head")


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.slow  # CLI subprocesses (a worker, or one per bad input): the full tier
def test_bad_input_gives_one_line_and_the_command(
    sqlite_storage_url: str, tiny: Path, tmp_path: Path
) -> None:
    one_line_error(
        cli("worker", "--study", "nope/head", "--storage", sqlite_storage_url),
        "no study 'nope/head'",
        "tlopt study create",
    )
    one_line_error(
        cli("study", "list", "--storage", "postgresql://me:s3cret@127.0.0.1:9/none"),
        "cannot open storage",
        "me:***@",
    )
    assert (
        "s3cret"
        not in cli("study", "list", "--storage", "postgresql://me:s3cret@127.0.0.1:9/none").stderr
    )
    one_line_error(
        cli(
            "study",
            "create",
            "--config",
            str(tiny),
            "--stage",
            "freeze1",
            "--storage",
            sqlite_storage_url,
        ),
        "no study 'tiny/head'",
        "tlopt worker --study tiny/head",
    )
    assert (
        cli(
            "study",
            "create",
            "--config",
            str(tiny),
            "--stage",
            "head",
            "--storage",
            sqlite_storage_url,
        ).returncode
        == 0
    )
    one_line_error(
        cli(
            "export-best",
            "--study",
            "tiny/head",
            "--out",
            str(tmp_path / "o"),
            "--storage",
            sqlite_storage_url,
        ),
        "no completed trial",
        "tlopt worker --study tiny/head",
    )
    one_line_error(
        cli("study", "create", "--config", str(tiny), "--stage", "freez1"), "unknown stage 'freez1'"
    )


def test_head_trials_train_together(storage_url: str, tiny: Path) -> None:
    """--heads-at-once: asked together, trained as one batch, reported and pruned one by one.

    Without dropout a batched trial's value equals the one-at-a-time trainer's (same params).
    """
    path = tiny.with_name("together.toml")
    path.write_text(TINY.replace('optimizer = ["sgd"]\n', 'optimizer = ["sgd"]\ndropout = [0.0]\n'))
    config = load_config(path)
    studies.create(config, "head", storage_url)
    # lr 3e-3 is in the study for sure (the sampler might never draw it in 6 trials).
    optuna.load_study(study_name="tiny/head", storage=storage_url).enqueue_trial(
        {"lr": 3e-3, "decay": "constant"}
    )
    summary = work("tiny/head", storage_url, heads_at_once=4)
    assert summary.complete + summary.pruned == 6
    head = optuna.load_study(study_name="tiny/head", storage=storage_url)
    assert finished(head) == 6 and not [t for t in head.trials if t.state == TrialState.FAIL]
    complete = [t for t in head.trials if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.value == pytest.approx(min(t.intermediate_values.values()))
        assert "tlopt.head_artifact" in t.user_attrs
    # Trials asked together start before any of them completes, so the first batch is not
    # pruned (as with parallel workers); lr 9 then trails the trials that learn.
    assert studies.best_trial(head).params["lr"] == 3e-3
    # Trained together: the 4 trials asked first ran their epochs as one batch, on one clock.
    first = [t for t in head.trials if t.number < 4]
    for epoch in range(4):
        clocks = {t.user_attrs["history"][epoch]["seconds"] for t in first}
        assert len(clocks) == 1, (epoch, clocks)

    # The same params one at a time, through fit: the same value.
    studies.create(config, "head", storage_url, name="tiny/head-alone")
    alone = optuna.load_study(study_name="tiny/head-alone", storage=storage_url)
    alone.enqueue_trial(complete[0].params)
    work("tiny/head-alone", storage_url, n_trials=1)
    alone = optuna.load_study(study_name="tiny/head-alone", storage=storage_url)
    assert alone.trials[0].value == pytest.approx(complete[0].value, rel=1e-4)
    studies.create(config, "freeze1", storage_url)  # starts from the best batched head


def test_export_best_of_a_batched_head_study_retrains_to_its_value(
    storage_url: str, tiny: Path, tmp_path: Path
) -> None:
    """Head trials tuned K at a time (the CLI's default), dropout on: export-best's lone
    retraining of the best one gives its tuned value and accuracy."""
    path = tiny.with_name("dropout.toml")
    path.write_text(TINY.replace('optimizer = ["sgd"]\n', 'optimizer = ["sgd"]\ndropout = [0.5]\n'))
    studies.create(load_config(path), "head", storage_url)
    work("tiny/head", storage_url, device="cpu", heads_at_once=8)  # the CLI's default
    head = optuna.load_study(study_name="tiny/head", storage=storage_url)
    best = studies.best_trial(head)
    manifest = export_best("tiny/head", tmp_path / "export", storage_url, device="cpu")
    assert manifest["trial"] == best.number
    assert manifest["retrained_value"] == pytest.approx(best.value, rel=1e-4)
    assert manifest["retrained_val_accuracy"] == pytest.approx(best.user_attrs["val_accuracy"])


def test_cropped_head_trials_never_train_on_cached_features(
    sqlite_storage_url: str, tiny: Path
) -> None:
    """A random-resized crop changes what the backbone sees at every step, so a head study
    that crops trains its trials through fit on the images, never on cached features."""
    from tlopt.tune.context import StudyContext
    from tlopt.tune.runner import can_batch_heads

    for crop, cached in (("[1.0]", True), ("[0.6]", False), ("[0.6, 1.0]", False)):
        path = tiny.with_name("crop.toml")
        path.write_text(
            TINY.replace('optimizer = ["sgd"]\n', f'optimizer = ["sgd"]\ncrop_scale = {crop}\n')
        )
        name = f"tiny/head-crop{crop}"
        studies.create(load_config(path), "head", sqlite_storage_url, name=name)
        ctx = StudyContext.open(
            optuna.load_study(study_name=name, storage=sqlite_storage_url), "cpu"
        )
        assert can_batch_heads(ctx) is cached, crop


def test_study_show_warns_of_a_trial_that_lost_the_head(sqlite_storage_url: str) -> None:
    """A fine-tuning trial whose first epoch lost more than 2 points of the head's accuracy."""
    from typer.testing import CliRunner

    from tlopt.cli import app

    study = optuna.create_study(study_name="ft/freeze1", storage=sqlite_storage_url)
    study.set_user_attr("tlopt.stage", "freeze1")
    for head, first in ((0.90, 0.89), (0.90, 0.50)):  # 1 point lost, then 40
        history = [
            {"epoch": e, "val_accuracy": acc, "val_loss": 0.3, "train_loss": 0.3}
            for e, acc in enumerate((head, first, 0.95))
        ]
        study.add_trial(optuna.trial.create_trial(value=0.3, user_attrs={"history": history}))
    shown = CliRunner().invoke(
        app, ["study", "show", "ft/freeze1", "--storage", sqlite_storage_url]
    )
    assert shown.exit_code == 0, shown.output
    warnings = [line for line in shown.output.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: trial 1 lost 40.0 points of the head's validation accuracy in its first "
        "epoch: lower [stages.freeze1] lr or raise warmup_epochs"
    ]
