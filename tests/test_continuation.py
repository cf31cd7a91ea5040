"""A continuation: a fine-tuning trial trained more epochs from the weights its parent kept.

A tiny timm model (random weights) on the built-in digits at 16 px, in one process."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tests.conftest import TINY_DATA_MODEL
from tlopt.config import load_config
from tlopt.tune import continuation
from tlopt.tune import study as studies
from tlopt.tune.budget import count_trials
from tlopt.tune.worker import work


@pytest.fixture
def freeze1(tmp_path: Path) -> str:
    """A head trial and one freeze1 trial of 2 epochs, whose space (one point) is used up."""
    path = tmp_path / "c.toml"
    path.write_text('name = "c"\nseed = 0\nn_trials = 1\n' + TINY_DATA_MODEL
                    + '[search]\nepochs = [2]\nbatch_size = [16]\nlr = [1e-3]\n')  # fmt: skip
    url, config = f"sqlite:///{tmp_path / 'c.db'}", load_config(path)
    studies.create(config, "head", url)
    work("c/head", url, device="cpu")
    studies.create(config, "freeze1", url)
    work("c/freeze1", url, device="cpu")
    return url


def test_a_continuation_starts_from_its_parents_best_epoch_and_runs_past_the_budget(
    freeze1: str, tmp_path: Path
) -> None:
    from tlopt.export.bundle import export_best

    url = freeze1
    study = studies.load("c/freeze1", url)
    (parent,) = study.trials
    assert continuation.can_continue(parent)  # the study's best kept its weights
    work("c/freeze1", url, device="cpu")  # the budget is reached: nothing runs
    assert len(studies.load("c/freeze1", url).trials) == 1

    c = continuation.enqueue(study, parent, 3)
    assert c.after == parent.user_attrs["best_epoch"] and c.weights
    work("c/freeze1", url, device="cpu")  # a queued continuation runs past the budget
    trials = studies.load("c/freeze1", url).trials
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    child = trials[1]
    assert continuation.of(child) == c and child.params == parent.params
    history = child.user_attrs["history"]
    # Its epoch 0 is the parent's kept model, evaluated: the parent's best validation loss.
    assert history[0]["epoch"] == 0
    assert history[0]["val_loss"] == pytest.approx(parent.value, rel=1e-4)
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert child.user_attrs["tlopt.train_params"]["epochs"] == 3
    lr = parent.user_attrs["tlopt.train_params"]["lr"]
    assert child.user_attrs["tlopt.train_params"]["lr"] == pytest.approx(lr * c.rate)
    # The pruner hears its epochs after the ones its start had trained.
    assert sorted(child.intermediate_values) == [c.after + 1, c.after + 2, c.after + 3]
    assert count_trials(studies.load("c/freeze1", url)) == (1, 0)  # epochs, not a point
    assert continuation.progress(studies.load("c/freeze1", url), 0) == "ended"  # not again
    assert continuation.progress(studies.load("c/freeze1", url), 1) is None

    # export-best retrains a continuation from the same kept weights: the same model.
    out = export_best("c/freeze1", tmp_path / "export", url, "cpu", retrain=True, trial=child)
    assert out["weights_from"] == "retrained"
    assert out["retrained_value"] == pytest.approx(child.value, rel=1e-3)


def _ended(
    epochs: int, best_epoch: int, run: int | None = None, **attrs: object
) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        params={"epochs": epochs},
        distributions={"epochs": optuna.distributions.CategoricalDistribution([epochs])},
        value=0.5,
        user_attrs={
            "best_epoch": best_epoch,
            "epochs_run": epochs if run is None else run,
            continuation.WEIGHTS: "w",
            **attrs,
        },  # fmt: skip
    )


def test_a_parent_whose_first_epoch_was_its_best_continues_at_a_tenth_of_its_rate() -> None:
    tenth = continuation.EARLY_RATE
    assert continuation.rate_after(_ended(6, 1)) == tenth  # every later epoch lost
    assert continuation.rate_after(_ended(6, 1, run=3)) == tenth  # stopped early at epoch 3
    assert continuation.rate_after(_ended(20, 10)) == 1.0  # still learning: its own rate
    assert continuation.rate_after(_ended(6, 2)) == 1.0
    assert continuation.rate_after(_ended(1, 1)) == 1.0  # one epoch: nothing says it lost
    # A continuation's own epochs and rate count: a tenth again after a tenth.
    grown = {continuation.CONTINUES: {"trial": 0, "weights": "w", "epochs": 4, "after": 1,
                                      "rate": tenth}}  # fmt: skip
    assert continuation.rate_after(_ended(6, 1, run=4, **grown)) == pytest.approx(tenth**2)
    assert continuation.rate_after(_ended(6, 3, run=4, **grown)) == tenth
    old = {continuation.CONTINUES: {"trial": 0, "weights": "w", "epochs": 4, "after": 1}}
    assert continuation.of(_ended(6, 4, **old)) == continuation.Continuation(0, "w", 4, 1, 1.0)


@pytest.mark.slow  # a whole budgeted tune run (it ends when its continuations do)
def test_time_the_stages_leave_continues_the_best_fine_tuning_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """freeze1's one point uses up its space at once: the time left before the export goes to
    continuations of its trial, within the budget, and the export is the run's best trial."""
    import json

    from tests.test_tune_command import tune_in_process

    path = tmp_path / "one.toml"
    path.write_text('name = "one"\nseed = 0\nn_trials = 4\n' + TINY_DATA_MODEL
                    + '[search]\nbatch_size = [32]\nepochs = [2]\nlr = [1e-3]\n'
                    + '[stages.freeze1]\nepochs = [2]\nlr = [1e-4]\ndecay = ["constant"]\n'
                    )  # fmt: skip
    run = tmp_path / "run"
    code, out, err = tune_in_process(
        ["--config", str(path), "--out", str(run), "--time", "2m", "--stages", "head,freeze1"],
        capsys,
        monkeypatch,
    )
    assert code == 0, err[-3000:]
    assert "continues for" in out, out
    url = f"sqlite:///{run / 'studies.db'}"
    trials = optuna.load_study(study_name="one/freeze1", storage=url).trials
    grown = [t for t in trials if continuation.of(t) is not None]
    assert len(trials) == 1 + len(grown) and 1 <= len(grown) <= 3
    first = continuation.of(grown[0])
    assert first is not None and first.trial == 0  # the first continues the stage's trial
    spent = json.loads((run / "run.json").read_text())["time"]["spent"]
    assert spent <= 120 * 1.1, out
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    values = [t.value for t in trials if t.value is not None]
    head = optuna.load_study(study_name="one/head", storage=url).best_value
    assert manifest["tuned_value"] == min([*values, head])


def test_time_left_after_the_continuations_runs_new_points_past_the_budget(
    tmp_path: Path,
) -> None:
    """Each stage's best was continued and time is left before the export: the better stage
    runs new points past its trial budget while its longest trial still ends before then."""
    import time

    from tlopt.run.grow import more_points
    from tlopt.run.held import Held
    from tlopt.run.placement import Placement
    from tlopt.tune.plan import StagePlan
    from tlopt.tune.timebox import Allotment

    path = tmp_path / "m.toml"
    path.write_text('name = "m"\nseed = 0\nn_trials = 1\n' + TINY_DATA_MODEL
                    + '[search]\nepochs = [1]\nbatch_size = [32]\nlr = [1e-3]\n'
                    + '[stages.freeze1]\nepochs = [1]\nlr = [1e-3, 3e-4, 1e-4]\n'
                    + 'decay = ["constant"]\n')  # fmt: skip
    url, config = f"sqlite:///{tmp_path / 'm.db'}", load_config(path)
    for stage in ("head", "freeze1"):
        studies.create(config, stage, url)
        work(f"m/{stage}", url, device="cpu")
    held, said = Held("m", url), []
    assert held.finished("freeze1") == 1  # its budget
    plan = StagePlan("freeze1", 0, (1,), {32: 1.0}, 1.0, trial_seconds=1.0)  # 5 s a trial
    a = Allotment("freeze1", 1, (1,), 10.0)
    args = (Placement(), said.append, lambda *_: None)
    assert more_points(held, config, a, plan, time.monotonic() + 4.0, *args) == 0  # none fits
    assert held.finished("freeze1") == 1 and said == []
    ran = more_points(held, config, a, plan, time.monotonic() + 90.0, *args)
    trials = studies.load("m/freeze1", url).trials
    assert ran == 2 and len(trials) == 3  # the space's other two rates, then it is used up
    assert sorted(t.params["lr"] for t in trials) == [1e-4, 3e-4, 1e-3]
    assert not any(continuation.is_continuation(t) for t in trials)
    assert said[0].startswith("stage freeze1: 1.5 min are left before the export: new points")
