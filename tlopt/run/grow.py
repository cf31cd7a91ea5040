"""What a run does with the time its stages leave (tlopt.run.tune): continuations, more epochs
for a fine-tuning stage's best trial from the weights it kept (tlopt.tune.continuation), then
new points of the better stage past its trial budget."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlopt.config import StudyConfig
    from tlopt.run.held import Held
    from tlopt.run.placement import Placement
    from tlopt.run.stage import Say
    from tlopt.tune.context import TrialDone
    from tlopt.tune.plan import StagePlan
    from tlopt.tune.timebox import Allotment

MAX_CONTINUATIONS = 3  # after the stages: at most this many, one after another


def continue_best(
    held: Held,
    stage: str,
    plan: StagePlan,
    until: float,
    slower: float,
    place: Placement,
    say: Say,
    on_trial_done: TrialDone,
) -> bool | None:
    """Continue the stage's best trial from its kept weights for its epochs, or as many as end
    before ``until`` (monotonic) at ``slower`` times the plan's costs: whether the new trial
    beat it; None when none ran (no kept weights, continued before, or no epoch fits). Raises
    KeyboardInterrupt on Ctrl-C or SIGTERM."""
    from tlopt.tune import continuation
    from tlopt.tune.timebox import epochs_that_fit
    from tlopt.tune.worker import STOP, work

    parent = held.best(stage)
    if parent is None or not continuation.can_continue(parent):
        return None
    stands = continuation.progress(held.study(stage), parent.number)
    if stands in ("running", "ended"):
        return None
    most = int(parent.params.get("epochs") or parent.user_attrs.get("epochs_run") or 0)
    batch = int(parent.params.get("batch_size") or 0)
    now = time.monotonic()
    epochs = epochs_that_fit(plan, batch, most, until - now, slower)
    if epochs < 1:
        return None
    if stands == "queued":  # a stopped run's: it resumes from its checkpoint
        say(f"stage {stage}: the continuation of trial {parent.number} resumes")
    else:
        c = continuation.enqueue(held.study(stage), parent, epochs)
        rate = "" if c.rate == 1.0 else f" at {c.rate:g} times its rate"
        say(
            f"stage {stage}: trial {parent.number} (val loss {parent.value:.4f}) continues "
            f"for {epochs} more epochs from its best epoch ({c.after} trained){rate}"
        )
    # One worker here runs it (the budget is reached for new points), up to ``until``.
    work(held.study_name(stage), held.url, max(1, held.finished(stage)), 60.0, place.device,
         threads=place.threads, on_trial_done=on_trial_done,
         deadline=time.time() + until - now)  # fmt: skip
    if STOP.is_set():
        raise KeyboardInterrupt
    best = held.best(stage)
    grew = best is not None and best.number != parent.number
    if best is not None:
        say(
            f"stage {stage}: best val_loss {best.value:.4f}"
            + (f" (trial {best.number}, the continuation)" if grew else " (unchanged)")
        )
    return grew


def more_points(
    held: Held,
    config: StudyConfig,
    a: Allotment,
    plan: StagePlan,
    until: float,
    place: Placement,
    say: Say,
    on_trial_done: TrialDone,
) -> int:
    """New points of stage ``a.stage`` past its trial budget, started while its longest epoch
    choice still ends before ``until`` (monotonic): the time the continuations leave (none left
    to run: each stage's best was continued) went unspent, 2.3 min of hymenoptera's 20 whose
    freeze1 had used its 20 trials. The trials it finished. Raises KeyboardInterrupt on Ctrl-C
    or SIGTERM."""
    from tlopt.run.stage import Box, run_stage
    from tlopt.tune.timebox import trial_seconds
    from tlopt.tune.worker import STOP

    now = time.monotonic()
    longest = trial_seconds(plan, (max(a.epochs),))
    if until - now < longest:
        return 0
    before = held.finished(a.stage)
    expect = max(1, int((until - now) // trial_seconds(plan, a.epochs)))
    say(f"stage {a.stage}: {(until - now) / 60:.1f} min are left before the export: new points")
    staged = replace(config, n_trials=before + 4 * expect)  # pruned trials end early
    box = Box(until - now - longest, time.time() + until - now, expect)
    run_stage(staged, a.stage, held, place, say, box, on_trial_done)
    if STOP.is_set():
        raise KeyboardInterrupt
    return held.finished(a.stage) - before
