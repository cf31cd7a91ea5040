"""Spending a time budget (``tlopt tune --time 20m``): how much each stage gets, how many trials
and which epoch choices, from the plan's measured costs.

The run's wall clock is one budget: the size probe and the plan (spent before this module is
asked), each stage, then the export (the best trial's kept weights, no retrain) and the report.
What a stage leaves unspent goes to the stages after it. Within a stage Optuna does the
rest: its sampler picks the points, the median pruner stops poor trials early, and the worker
starts no trial after the stage's time (Optuna's own ``timeout`` semantics) and stops the one
running at the run's last moment for the export (it is queued again, so a rerun with more time
resumes it).

The rule, per stage:

* ``head`` trains heads on cached features: after its one feature pass a trial costs seconds,
  so it keeps its trial budget and epoch choices unless they pass :data:`HEAD_SHARE` of the time.
* Fine-tuning stages are taken cheapest first while each can run :data:`TRIALS_LEAST` trials
  of :data:`MIN_EPOCHS` (or its shortest given choice); the others are left out, said why.
  What is left is shared equally. A stage's epoch choices come from its share and its
  measured epoch cost: enough for :data:`TRIALS_WANTED` trials of the longer choice, the
  shorter one half of it (a study file's or ``--epochs``' choices are kept), and as many
  trials as fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tlopt.durations import format_duration

if TYPE_CHECKING:
    from tlopt.tune.plan import Plan, StagePlan

PROBE_SHARE = 0.15  # at most this share of the budget for the image size probe
HEAD_SHARE = 0.3  # at most this share of the stages' time for the head stage
TRIALS_WANTED = 4  # fine-tuning trials a share should hold at its longer epoch choice
MAX_EPOCHS = 50  # a fine-tuning trial from a trained head seldom gains past this
MIN_EPOCHS = 3  # shorter fine-tuning trials are mostly warm-up (one epoch by default)
TRIALS_LEAST = 2  # a fine-tuning stage runs only if this many of its shortest trials fit
TRIAL_OVERHEAD_S = 2.0  # per trial: the model built, its records written
REPORT_S = 15.0  # the report after the export
HOLDS = "holds its finished trials"  # the why of a stage with nothing left to run


@dataclass(frozen=True)
class Allotment:
    """One stage's share of the budget: its trials, epoch choices and seconds (0: left out)."""

    stage: str
    trials: int
    epochs: tuple[int, ...]
    seconds: float
    why: str = ""  # why the stage is left out, or why its trials are few


def trial_seconds(s: StagePlan, epochs: tuple[int, ...]) -> float:
    """A trial's expected seconds at ``epochs`` (their mean), by the stage's measured costs."""
    per_epoch = sum(s.epoch_seconds.values()) / max(1, len(s.epoch_seconds))
    return TRIAL_OVERHEAD_S + s.trial_seconds + float(sum(epochs)) / len(epochs) * per_epoch


def export_seconds(plan: Plan) -> float:
    """The export's reserve: it loads the weights the best trial kept (no retrain), maps every
    image to its descriptor (about the head's feature pass again) and writes the report."""
    head = next((s for s in plan.stages if s.stage == "head"), None)
    return (head.setup_seconds * 1.5 if head else 0.0) + REPORT_S


def allot(
    plan: Plan,
    seconds: float,
    fixed_epochs: set[str],
    max_trials: dict[str, int],
    reserve: float | None = None,
) -> list[Allotment]:
    """Share ``seconds`` (what is left for the stages, the export and the report) among the
    plan's stages. ``fixed_epochs``: stages whose epoch choices are kept (the user's, or
    their studies'); ``max_trials``: each stage's trials still to run at most (its budget less
    the finished); ``reserve``: the export and report's seconds (None: the plan's guess)."""
    reserve = export_seconds(plan) if reserve is None else reserve
    return _share(plan, seconds - reserve, fixed_epochs, max_trials)


def _share(
    plan: Plan, seconds: float, fixed_epochs: set[str], max_trials: dict[str, int]
) -> list[Allotment]:
    todo = [s for s in plan.stages if max_trials.get(s.stage, s.trials) > 0]
    shares: dict[str, Allotment] = {}
    left = max(0.0, seconds)
    head = next((s for s in todo if s.stage == "head"), None)
    if head is not None:
        # Every other stage starts from a head: it gets at least its set-up and one trial.
        least_head = head.setup_seconds + trial_seconds(head, head.epochs[:1])
        share = min(left, max(seconds * HEAD_SHARE, least_head))
        shares["head"] = _head(head, share, max_trials.get("head", 0), "head" in fixed_epochs)
        left -= shares["head"].seconds

    # Fine-tuning stages, cheapest epoch first, while the least each needs fits (its set-up
    # and TRIALS_LEAST of its shortest trials); then what is left, in equal parts.
    def least_of(s: StagePlan) -> float:
        cap = max_trials.get(s.stage, 0)
        shortest = trial_seconds(s, _shortest(s, s.stage in fixed_epochs))
        return s.setup_seconds + min(cap, TRIALS_LEAST) * shortest

    tuning = sorted((s for s in todo if s.stage != "head"), key=lambda s: least_of(s))
    fits, least = [], 0.0
    for s in tuning:
        if least + least_of(s) <= left:
            fits.append(s)
            least += least_of(s)
        else:
            shares[s.stage] = Allotment(s.stage, 0, s.epochs, 0.0,
                                        _short(s, left - least, least_of(s)))  # fmt: skip
    surplus = (left - least) / max(1, len(fits))
    for i, s in enumerate(fits):
        a = _fine_tune(
            s, least_of(s) + surplus, max_trials.get(s.stage, 0), s.stage in fixed_epochs
        )
        shares[s.stage] = a
        if i + 1 < len(fits):  # what a stage cannot use goes to the ones after it
            surplus += (least_of(s) + surplus - a.seconds) / (len(fits) - i - 1)
    return [shares.get(s.stage) or Allotment(s.stage, 0, s.epochs, 0.0, HOLDS)
            for s in plan.stages]  # fmt: skip


def _shortest(s: StagePlan, fixed: bool) -> tuple[int, ...]:
    """The epochs of the cheapest trial worth running: the shortest choice, or MIN_EPOCHS."""
    return (min(s.epochs),) if fixed else (MIN_EPOCHS,)


def _head(s: StagePlan, seconds: float, cap: int, fixed: bool) -> Allotment:
    epochs = s.epochs
    while True:
        per = trial_seconds(s, epochs)
        n = min(cap, int((seconds - s.setup_seconds) // per)) if per > 0 else cap
        if n >= min(cap, TRIALS_WANTED) or fixed or len(epochs) == 1:
            break
        epochs = epochs[: max(1, len(epochs) - 1)]  # drop the longest choice first
    if n < 1:
        return Allotment(s.stage, 0, epochs, 0.0, _short(s, seconds, s.setup_seconds + per))
    return Allotment(s.stage, n, epochs, s.setup_seconds + n * per)


def _fine_tune(s: StagePlan, seconds: float, cap: int, fixed: bool) -> Allotment:
    per_epoch = sum(s.epoch_seconds.values()) / max(1, len(s.epoch_seconds))
    per_trial = TRIAL_OVERHEAD_S + s.trial_seconds
    room = seconds - s.setup_seconds
    if fixed:
        epochs = s.epochs
    else:
        total = (room - TRIALS_WANTED * per_trial) / per_epoch if per_epoch > 0 else MAX_EPOCHS
        longest = max(MIN_EPOCHS, min(MAX_EPOCHS, math.floor(total / TRIALS_WANTED)))
        epochs = tuple(sorted({max(MIN_EPOCHS, round(longest / 2)), longest}))
    per = trial_seconds(s, epochs)
    n = min(cap, int(room // per)) if per > 0 else cap
    if n < 1 and room >= trial_seconds(s, epochs[:1]):  # one trial, if the sampler picks short
        n, per = min(cap, 1), trial_seconds(s, epochs[:1])
    if n < 1:
        return Allotment(s.stage, 0, epochs, 0.0, _short(s, seconds, s.setup_seconds + per))
    why = "" if n >= min(cap, TRIALS_WANTED) else f"{n} trial(s) fit in {seconds / 60:.1f} min"
    return Allotment(s.stage, n, epochs, s.setup_seconds + n * per, why)


def _short(s: StagePlan, seconds: float, cost: float) -> str:
    return (
        f"left out: its set-up and one trial cost {cost / 60:.1f} min here, "
        f"{max(0.0, seconds) / 60:.1f} min are left for it"
    )


def table(allotted: list[Allotment], budget: float, spent: float, reserve: float) -> list[str]:
    """The time plan as lines: per stage its trials, epoch choices and minutes; the export."""
    lines = [
        f"time budget {format_duration(budget)}: {spent / 60:.1f} min spent before the stages "
        "(size probe, plan; earlier runs of this folder); each stage's share:"
    ]
    for a in allotted:
        epochs = ",".join(map(str, a.epochs))
        note = f"  ({a.why})" if a.why else ""
        lines.append(f"  {a.stage:<10}{a.trials:>4} trials  epochs {epochs:<10}"
                     f"{a.seconds / 60:>6.1f} min{note}")  # fmt: skip
    lines.append(f"  export + report {reserve / 60:.1f} min")
    return lines
