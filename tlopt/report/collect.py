"""What the report reads from a study: its finished trials, their settings, curves and cost."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tlopt.config import StudyConfig
from tlopt.names import ATTR

# The settings the report groups trials by, with the words a reader sees.
SETTINGS = {"batch_size": "batch size", "epochs": "epochs", "decay": "decay type"}


@dataclass
class TrialView:
    """One finished (complete or pruned) trial."""

    number: int
    pruned: bool
    value: float | None  # best validation loss (complete trials only)
    val_accuracy: float | None  # validation accuracy at the best epoch
    history: list[dict[str, float]]
    setting: dict[str, Any]  # batch_size, epochs, decay: searched or fixed by the study
    seconds: float | None  # wall time from start to finish

    @property
    def last_val_loss(self) -> float | None:
        """The last finite validation loss reported (where a pruned trial stopped)."""
        finite = [h["val_loss"] for h in self.history if math.isfinite(h["val_loss"])]
        return finite[-1] if finite else None


@dataclass
class StudyView:
    """A study as the report sees it."""

    name: str
    stage: str
    study: optuna.Study
    trials: list[TrialView]
    failed: int
    fixed: dict[str, Any] = field(default_factory=dict)  # settings with one choice

    @property
    def complete(self) -> list[TrialView]:
        return [t for t in self.trials if not t.pruned]

    @property
    def pruned(self) -> list[TrialView]:
        return [t for t in self.trials if t.pruned]

    @property
    def best(self) -> TrialView | None:
        """The complete trial with the lowest validation loss (Optuna's best trial)."""
        done = [t for t in self.complete if t.value is not None]
        return min(done, key=lambda t: t.value or 0.0) if done else None

    @property
    def wall_seconds(self) -> float:
        """Wall time summed over the finished trials (the compute the study cost)."""
        return sum(t.seconds or 0.0 for t in self.trials)


def collect(study: optuna.Study) -> StudyView:
    """Read the finished trials of a tlopt study (or of any Optuna study, with less detail)."""
    stage = str(study.user_attrs.get(ATTR + "stage", "-"))
    fixed = _fixed_settings(study.user_attrs.get(ATTR + "config"), stage)
    trials, failed = [], 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL:
            failed += 1
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            trials.append(_trial_view(t, fixed))
    return StudyView(study.study_name, stage, study, trials, failed, fixed)


def _trial_view(t: FrozenTrial, fixed: dict[str, Any]) -> TrialView:
    history = [
        {k: float(v) if v is not None else math.nan for k, v in h.items()}
        for h in t.user_attrs.get("history", [])
    ]
    seconds = None
    if t.datetime_start and t.datetime_complete:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
    setting = {k: t.params.get(k, fixed.get(k)) for k in SETTINGS}
    return TrialView(
        number=t.number,
        pruned=t.state == TrialState.PRUNED,
        value=t.value if t.state == TrialState.COMPLETE else None,
        val_accuracy=t.user_attrs.get("val_accuracy"),
        history=history,
        setting=setting,
        seconds=seconds,
    )


def _fixed_settings(config: dict[str, Any] | None, stage: str) -> dict[str, Any]:
    """The settings a study fixed (one choice), which Optuna does not record as params."""
    if not config:
        return {}
    try:
        space = StudyConfig.from_dict(config).space_for(stage)
    except Exception:  # a snapshot of another tlopt version: group by searched params only
        return {}
    choices = {k: getattr(space, k) for k in SETTINGS}
    return {k: v[0] for k, v in choices.items() if isinstance(v, tuple) and len(v) == 1}
