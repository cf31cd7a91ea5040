"""A fine-tuning trial whose training repeats a complete trial's first epochs takes their figures
(tlopt.tune.replay). A tiny timm model (random weights) on the built-in digits at 16 px, in one
process; the points are queued, so which trial repeats which is known."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tests.conftest import TINY_DATA_MODEL
from tlopt.config import load_config
from tlopt.tune import objective
from tlopt.tune import study as studies
from tlopt.tune.replay import SAME_AS
from tlopt.tune.worker import work


def _two_trials(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    decays: list[str],
    first: dict[str, object],
    second: dict[str, object],
) -> tuple[list[int], list[optuna.trial.FrozenTrial]]:
    """freeze1 trials at the points ``first`` then ``second`` (epochs 2 or 3, one of
    ``decays``): (the epochs of each trial ``fit`` trained, the study's trials)."""
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\nseed = 0\nn_trials = 2\n' + TINY_DATA_MODEL
                    + f'[search]\nepochs = [2, 3]\nbatch_size = [16]\nlr = [1e-3]\n'
                    f"decay = {decays!r}\n".replace("'", '"'))  # fmt: skip
    url, config = f"sqlite:///{tmp_path / 'r.db'}", load_config(path)
    studies.create(config, "head", url)
    work("r/head", url, device="cpu")
    studies.create(config, "freeze1", url)
    study = studies.load("r/freeze1", url)
    rates = config.space_for("freeze1").lr  # choices: one for both trials
    assert isinstance(rates, tuple)
    lr = rates[0]
    study.enqueue_trial({"lr": lr, **first})
    study.enqueue_trial({"lr": lr, **second})
    trained: list[int] = []
    real = objective.train_setup

    def counted(setup, *args, **kwargs):  # type: ignore[no-untyped-def]
        trained.append(setup.params.epochs)
        return real(setup, *args, **kwargs)

    monkeypatch.setattr(objective, "train_setup", counted)
    work("r/freeze1", url, device="cpu")
    return trained, list(studies.load("r/freeze1", url).trials)


def test_a_shorter_trial_at_a_constant_rate_takes_the_first_epochs_of_a_longer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained, (longer, shorter) = _two_trials(
        tmp_path, monkeypatch, ["constant"], {"epochs": 3}, {"epochs": 2}
    )
    assert trained == [3]  # the 2-epoch trial trained nothing
    assert longer.state.name == shorter.state.name == "COMPLETE"
    assert shorter.user_attrs[SAME_AS] == 0 and SAME_AS not in longer.user_attrs
    assert shorter.user_attrs["history"] == [
        r for r in longer.user_attrs["history"] if r["epoch"] <= 2
    ]
    assert shorter.intermediate_values == {k: longer.intermediate_values[k] for k in (1, 2)}
    first_two = [r["val_loss"] for r in longer.user_attrs["history"] if 1 <= r["epoch"] <= 2]
    assert shorter.value == pytest.approx(min(first_two), rel=1e-5)
    if longer.user_attrs["best_epoch"] <= 2:  # the same best epoch: the same value, exactly
        assert shorter.value == longer.value


def test_a_schedule_that_reads_the_epochs_trains_the_shorter_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A polynomial decay over 2 epochs lowers the rate of epoch 2 more than over 3."""
    trained, (_, shorter) = _two_trials(
        tmp_path, monkeypatch, ["polynomial"], {"epochs": 3}, {"epochs": 2}
    )
    assert trained == [3, 2] and SAME_AS not in shorter.user_attrs


def test_a_longer_trial_than_any_before_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained, (_, longer) = _two_trials(
        tmp_path, monkeypatch, ["constant"], {"epochs": 2}, {"epochs": 3}
    )
    assert trained == [2, 3] and SAME_AS not in longer.user_attrs


def test_a_constant_rate_repeats_a_step_decay_before_its_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``step`` halves the rate every 10 epochs: for 2 epochs it is ``constant``."""
    trained, (step, constant) = _two_trials(
        tmp_path, monkeypatch, ["step", "constant"], {"epochs": 2, "decay": "step"},
        {"epochs": 2, "decay": "constant"},
    )  # fmt: skip
    assert trained == [2] and constant.user_attrs[SAME_AS] == step.number
    assert constant.params["decay"] == "constant" and constant.value == step.value
