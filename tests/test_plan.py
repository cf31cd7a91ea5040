"""The plan ``tlopt tune`` prints before its first trial: measured per stage, finished ones free."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from tests.conftest import TINY_DATA_MODEL
from tests.test_tune_command import tune_in_process
from tlopt.config import load_config
from tlopt.tune.plan import Plan, make_plan, warning

STAGES = ["head", "freeze1", "freeze2"]


def tiny_study(tmp_path: Path) -> Path:
    """Digits at 16 px on timm's test_efficientnet; one batch size and one epoch: seconds."""
    path = tmp_path / "tiny.toml"
    text = 'name = "tiny"\nn_trials = 1\n' + TINY_DATA_MODEL
    path.write_text(text + "[search]\nbatch_size = [32]\nepochs = [1]\n")
    return path


def test_plan_lists_every_stage_with_positive_epoch_costs(tmp_path: Path) -> None:
    plan = make_plan(load_config(tiny_study(tmp_path)), STAGES, lambda stage: 1)
    assert [s.stage for s in plan.stages] == STAGES
    for s in plan.stages:
        assert s.trials == 1 and s.epochs == (1,)
        assert list(s.epoch_seconds) == [32] and s.epoch_seconds[32] > 0, s
        assert s.seconds > 0
    assert plan.seconds == pytest.approx(sum(s.seconds for s in plan.stages))


@pytest.mark.parametrize("warm", [False, True])
def test_a_warm_model_times_its_first_step_instead_of_a_warm_up_step(warm: bool) -> None:
    """After the first batch size the model is warm: no step is trained only to be dropped."""
    import torch

    from tlopt.tune.plan import TIMED_STEPS, _timed_steps

    steps: list[int] = []

    def train(should_stop: object) -> None:
        while not should_stop():  # type: ignore[operator]
            steps.append(1)  # a step far shorter than STEP_BUDGET_S: the count stops it

    step, _first = _timed_steps(torch.device("cpu"), train, warm)
    assert len(steps) == TIMED_STEPS + (0 if warm else 1) + 1 and step >= 0


def test_stage_estimate_scales_with_trials_and_epochs(tmp_path: Path) -> None:
    (stage,) = make_plan(load_config(tiny_study(tmp_path)), ["freeze1"], lambda _: 2).stages
    assert stage.trials == 2
    per_trial = (stage.seconds - stage.setup_seconds) / 2
    doubled = replace(stage, trials=4)  # the same measurement, twice the trials
    assert doubled.seconds - doubled.setup_seconds == pytest.approx(2 * 2 * per_trial)
    longer = replace(stage, epochs=(2, 4))  # mean 3 epochs against 1
    epoch_part = per_trial - stage.trial_seconds
    assert (longer.seconds - stage.setup_seconds) / 2 == pytest.approx(
        stage.trial_seconds + 3 * epoch_part
    )


def test_warning_over_3_hours_names_what_shortens_it(tmp_path: Path) -> None:
    (stage,) = make_plan(load_config(tiny_study(tmp_path)), ["head"], lambda _: 1).stages
    assert warning(Plan((stage,), "cpu")) is None  # seconds, not hours
    epochs = 3 * 3600 / stage.epoch_seconds[32] + 1  # one trial past 3 hours
    line = warning(Plan((replace(stage, epochs=(int(epochs),)),), "cpu"))
    assert line is not None and "3 h" in line
    assert all(flag in line for flag in ("--trials", "--epochs", "--stages"))


def test_plan_only_prints_the_plan_and_a_warning_and_runs_no_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    args = ["--config", str(tiny_study(tmp_path)), "--out", str(run), "--plan-only"]
    # Any measured cost is over the bar (a fast machine plans 10,000 epochs under 3 h).
    monkeypatch.setattr("tlopt.tune.plan.WARN_HOURS", 1e-9)
    code, out, err = tune_in_process([*args, "--epochs", "10000"], capsys, monkeypatch)
    assert code == 0, err
    assert out.splitlines()[0].startswith("plan: measured in ")  # what the plan cost
    lines = out.splitlines()[1:]
    assert lines[0].startswith("plan (measured on cpu")
    assert [line.split()[0] for line in lines[2:5]] == STAGES
    assert lines[5].lstrip().startswith("total")
    assert lines[6].startswith("warning:") and "--epochs" in lines[6]
    db = run / "studies.db"  # nothing created, nothing run
    assert not db.exists() or not optuna.get_all_study_names(f"sqlite:///{db}")


def test_tune_prints_the_plan_before_the_first_trial_and_a_finished_stage_costs_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    args = ["--config", str(tiny_study(tmp_path)), "--out", str(run), "--stages", "head"]
    code, out, err = tune_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    plan = next(i for i, line in enumerate(lines) if line.startswith("plan (measured"))
    running = next(i for i, line in enumerate(lines) if line.startswith("stage head: running"))
    assert plan < running
    assert lines[plan + 2].split()[:2] == ["head", "1"]
    recorded = json.loads((run / "summary.json").read_text())["plan"]
    assert recorded["stages"][0]["stage"] == "head" and recorded["stages"][0]["trials"] == 1

    code, out, err = tune_in_process([*args, "--plan-only"], capsys, monkeypatch)
    assert code == 0, err
    head = next(line for line in out.splitlines() if line.split()[:1] == ["head"])
    assert head.split()[1] == "0" and head.split()[-1] == "0.0"  # finished: nothing to run


def test_on_the_cpu_a_fine_tuning_stage_times_one_batch_size_and_scales_it_per_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import math

    import torch

    from tlopt.tune import plan as plan_module

    assert plan_module.timed_batch_sizes((8, 16, 32), torch.device("cpu")) == [16]
    assert plan_module.timed_batch_sizes((8, 16, 32), torch.device("cuda")) == [8, 16, 32]
    assert plan_module.timed_batch_sizes((32,), torch.device("cpu")) == [32]

    path = tiny_study(tmp_path)
    path.write_text(path.read_text().replace("batch_size = [32]", "batch_size = [4, 8, 16]"))
    timed: list[int] = []
    step_seconds = plan_module._step_seconds

    def counted(ctx: object, setup: object, *args: object, **kw: object) -> tuple[float, float]:
        timed.append(setup.params.batch_size)  # type: ignore[attr-defined]
        return step_seconds(ctx, setup, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(plan_module, "_step_seconds", counted)
    (stage,) = make_plan(load_config(path), ["freeze1"], lambda _: 1).stages
    assert timed == [8]
    from tlopt.tune.context import open_config_source

    config = load_config(path)  # the train split's images, as the plan's Pieces hold them
    pieces = plan_module.Pieces(config, open_config_source(config), "cpu")
    n = len(pieces.context("freeze1").split("train"))
    val = stage.trial_seconds  # freeze1 starts from the head: its trials evaluate epoch 0
    per_image = {
        bs: (seconds - val) / (math.ceil(n / bs) * bs)
        for bs, seconds in stage.epoch_seconds.items()
    }
    assert list(per_image) == [4, 8, 16]
    assert per_image[4] == pytest.approx(per_image[8]) and per_image[16] == pytest.approx(
        per_image[8]
    )
