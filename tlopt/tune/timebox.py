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
* The fine-tuning stages compete for their time (:func:`turns`): each first runs
  :data:`FIRST_SHARE` of its share (its first trials, judged by the pruner from epoch 1), then
  what the stages left goes to the one whose best validation loss is lower.
"""

from __future__ import annotations

import math
import statistics
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
# The export and report's reserve grows with the machine's measured slowdown, up to this: at
# load 5 they took twice their reserve and a 75 s budget went 28 s over (issue 29.7).
MAX_SLOWDOWN = 4.0
FIRST_SHARE = 0.5  # of a competing fine-tuning stage's share: its first turn
BETTER = ""  # in turns(): the second turn, for the fine-tuning stage that is better by then
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


def epochs_that_fit(
    s: StagePlan, batch_size: int, most: int, seconds: float, slower: float = 1.0
) -> int:
    """How many epochs (at most ``most``) of a trial at ``batch_size`` end within ``seconds``,
    by the stage's measured costs ``slower`` times over (a continuation's length)."""
    costs = list(s.epoch_seconds.values())
    per_epoch = s.epoch_seconds.get(batch_size, sum(costs) / max(1, len(costs))) * slower
    room = seconds - TRIAL_OVERHEAD_S - s.trial_seconds * slower
    if per_epoch <= 0:
        return most if room > 0 else 0
    return max(0, min(most, int(room // per_epoch)))


def pace(s: StagePlan, seconds: float, epochs: int, batch_size: int) -> float | None:
    """A finished trial's training seconds over what the plan measured for it (its epochs at
    its batch size): above 1 when the machine runs slower than when the plan was measured
    (another job started beside the run). None: the plan has no cost for it."""
    per_epoch = s.epoch_seconds.get(batch_size)
    # With the per-trial overhead, as trial_seconds plans it: a trial of a tiny network is
    # mostly that (0.2 s an epoch planned, seconds of records: a pace of 8 on an idle machine).
    planned = TRIAL_OVERHEAD_S + s.trial_seconds + epochs * per_epoch if per_epoch else 0.0
    return seconds / planned if planned > 0 and epochs > 0 else None


def no_new_trial(s: StagePlan, a: Allotment, holds: bool, left: float) -> str | None:
    """Why a stage's turn starts no new trial: it holds a complete trial (``holds``) and its
    shortest trial does not end in the ``left`` seconds of the turn. elpv's freeze1 started a
    3-epoch trial with 0.0 min left of its turn: 2.5 min to be pruned, where the continuations
    after the stages would have used them. None: the turn starts trials."""
    least = trial_seconds(s, (min(a.epochs),))
    if not holds or left >= least:
        return None
    return (
        f"no new trial fits in the {max(0.0, left) / 60:.1f} min left of its turn "
        f"(one costs {least / 60:.1f} min here)"
    )


def slowdown(paces: list[float], recent: int = 8) -> float:
    """How much slower the machine runs than the plan measured: the median of the last
    ``recent`` trials' paces, at least 1 (a faster machine keeps the reserve it has) and at
    most :data:`MAX_SLOWDOWN`.

    Example:
        >>> slowdown([]), slowdown([0.5, 0.8]), slowdown([1.1, 2.0, 2.4])
        (1.0, 1.0, 2.0)
    """
    last = paces[-recent:]
    return min(MAX_SLOWDOWN, max(1.0, statistics.median(last))) if last else 1.0


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


def turns(allotted: list[Allotment]) -> list[tuple[str, float]]:
    """The stages' turns in order, (stage, seconds): each stage its share, but when two or
    more fine-tuning stages run with two trials or more each (:func:`competing`), each first
    gets :data:`FIRST_SHARE` of its share and a last turn (stage :data:`BETTER`) takes what
    they left, for the better one (issue 28.2: stages competing for the fine-tuning time
    rather than equal shares).

    Example:
        >>> turns([Allotment("head", 9, (10,), 60.0), Allotment("freeze1", 3, (3,), 100.0),
        ...        Allotment("freeze2", 2, (3,), 80.0)])
        [('head', 60.0), ('freeze1', 50.0), ('freeze2', 40.0), ('', 90.0)]
        >>> turns([Allotment("freeze1", 1, (20,), 120.0), Allotment("freeze2", 1, (20,), 110.0)])
        [('freeze1', 120.0), ('freeze2', 110.0)]
    """
    tuning = competing(allotted)
    if not tuning:
        return [(a.stage, a.seconds) for a in allotted]
    first = [(a.stage, a.seconds * FIRST_SHARE if a in tuning else a.seconds) for a in allotted]
    return [*first, (BETTER, sum(a.seconds * (1 - FIRST_SHARE) for a in tuning))]


def competing(allotted: list[Allotment]) -> list[Allotment]:
    """The fine-tuning stages that take turns: two or more that run, each with two trials or
    more; none when a stage holds one (half its share would not fit its trial: the demo's
    one-point stages at ``--time 5m`` ran freeze1 alone and left freeze2 out)."""
    tuning = _tuning(allotted)
    return tuning if len(tuning) > 1 and all(a.trials > 1 for a in tuning) else []


def _tuning(allotted: list[Allotment]) -> list[Allotment]:
    """The fine-tuning stages that run trials."""
    return [a for a in allotted if a.stage != "head" and a.trials > 0]


def rungs(allotted: list[Allotment], pruner: str, startup: int, warmup: int) -> list[str]:
    """How the fine-tuning time is spent, as lines for the plan: where the pruner judges
    (each epoch is a rung) and how the stages compete (:func:`turns`)."""
    if not _tuning(allotted):
        return []
    lines = []
    if pruner in ("median", "percentile"):
        lines.append(
            f"  rungs: the {pruner} pruner judges each trial at every epoch from epoch "
            f"{max(1, warmup)} against the completed trials (once {max(1, startup)} completed)"
        )
    else:
        lines.append(f"  rungs: as the {pruner} pruner sets them")
    if stages := [a.stage for a in competing(allotted)]:
        lines.append(
            f"  turns: {', '.join(stages)} first run {FIRST_SHARE:.0%} of their share each; "
            "the rest goes to the one with the lower validation loss, whose best trial first "
            "continues from its kept weights for as many epochs again"
        )
    lines.append(
        "  continuations: time the stages leave before the export continues the best "
        "fine-tuning trial not continued yet, the better stage's first; a trial whose first "
        "epoch was its best continues at a tenth of its rate; then new points of the better "
        "stage, past its trial budget"
    )
    return lines


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
