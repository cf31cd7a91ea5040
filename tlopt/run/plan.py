"""A run's plan and its time: the stages' measured costs (kept in the record, so that a rerun
measures nothing again) and the time budget's share per stage (tlopt.tune.timebox)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tlopt.config import StudyConfig
from tlopt.durations import format_duration
from tlopt.errors import ConfigError
from tlopt.tune.timebox import Allotment

if TYPE_CHECKING:
    from tlopt.run.held import Held
    from tlopt.run.placement import Placement
    from tlopt.run.record import RunRecord
    from tlopt.run.stage import Say
    from tlopt.tune.plan import Plan


def measured_plan(
    config: StudyConfig,
    names: list[str],
    held: Held,
    place: Placement,
    record: RunRecord,
    say: Say,
) -> tuple[Plan, dict[str, Any]]:
    """The measured plan and its record: the record's, when it was measured for this run as it
    is now (a rerun measures nothing again), else measured here (tlopt.tune.plan)."""
    from tlopt.tune.plan import make_plan

    key = _key(config, names, place)
    left = {st: held.remaining(config, st) for st in names}
    was = record.get("measured_plan")
    plan = _recorded(was, key, config, left) if isinstance(was, dict) else None
    if plan is None:
        began = time.monotonic()
        plan = make_plan(config, names, left.__getitem__, place.plan_device, place.heads_at_once)
        say(f"plan: measured in {time.monotonic() - began:.0f} s (the frozen features included)")
    else:
        say("plan: as measured by this run before (its costs per epoch and trial)")
    return plan, {"key": key, "plan": plan.as_dict()}


def _key(config: StudyConfig, names: list[str], p: Placement) -> dict[str, Any]:
    """What the measured costs hold for."""
    key = {
        "backbone": config.model.backbone,
        "weights": config.model.weights,
        "image_size": config.data.image_size,
        "data": config.data.path,
        "device": p.plan_device,
        "threads": p.threads,
        "processes": p.processes,
        "heads_at_once": p.heads_at_once,
        "batch_sizes": {s: list(config.space_for(s).batch_size) for s in names},
    }
    return dict(json.loads(json.dumps(key)))  # as the record holds it


def _recorded(
    was: dict[str, Any], key: dict[str, Any], config: StudyConfig, left: dict[str, int]
) -> Plan | None:
    """The recorded measured plan, for the run as it is now (None: measured for another)."""
    from tlopt.tune.plan import Plan, StagePlan

    if was.get("key") != key:
        return None
    try:
        stages = {s["stage"]: s for s in was["plan"]["stages"]}
        plans = []
        for stage, trials in left.items():
            s = stages[stage]
            costs = {int(k): float(v) for k, v in s["epoch_seconds"].items()}
            if trials and not costs:  # not measured then (nothing was left to run)
                return None
            epochs = config.space_for(stage).epochs
            setup, per_trial = float(s["setup_seconds"]), float(s["trial_seconds"])
            plans.append(StagePlan(stage, trials, epochs, costs, setup, per_trial))
        return Plan(tuple(plans), str(was["plan"]["device"]))
    except (KeyError, TypeError, ValueError):
        return None


def export_reserve(record: RunRecord, plan: Plan) -> float:
    """The export and report's reserve: as this run measured them, else the plan's guess."""
    from tlopt.tune.timebox import REPORT_S, export_seconds

    was, report = record.get("export_seconds"), record.get("report_seconds")
    if isinstance(was, (int, float)):
        return float(was) + (float(report) if isinstance(report, (int, float)) else REPORT_S)
    return export_seconds(plan)


def allot_time(
    config: StudyConfig,
    names: list[str],
    held: Held,
    plan: Plan,
    seconds: float,
    keep: set[str],
    reserve: float,
) -> tuple[StudyConfig, list[Allotment], Plan]:
    """The time budget's share per stage; the config with the chosen epochs; the plan of it.
    ``keep``: the stages whose epoch choices stand (the user's, their studies')."""
    from tlopt.tune.timebox import HOLDS, allot

    caps = {st: held.remaining(config, st) for st in names}
    shares = allot(plan, seconds, keep, caps, reserve)
    stages = {**config.stages}
    for a in shares:
        if a.stage not in keep and a.trials:
            stages[a.stage] = {**stages.get(a.stage, {}), "epochs": a.epochs}
    shown = tuple(
        replace(s, trials=a.trials, epochs=a.epochs)
        for s, a in zip(plan.stages, shares, strict=True)
    )
    head = next((a for a in shares if a.stage == "head"), None)
    if head is not None and head.trials == 0 and head.why != HOLDS:  # the others need it
        raise ConfigError(
            f"--time {format_duration(config.time_budget)} is too short for the head stage "
            f"({head.why}): give a longer --time"
        )
    return replace(config, stages=stages), shares, replace(plan, stages=shown)
