"""``image_size = "auto"``: the size probe's choice, made once per run folder (a rerun reads it
from the record before anything else is measured)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tlopt.config import StudyConfig

if TYPE_CHECKING:
    from tlopt.run.placement import Placement
    from tlopt.run.record import RunRecord
    from tlopt.run.stage import Say


def probe_key(config: StudyConfig) -> dict[str, Any]:
    """What a probe's choice holds for: the backbone, its weights and the data."""
    return {
        "backbone": config.model.backbone,
        "weights": config.model.weights,
        "data": config.data.path or config.data.source,
    }


def recorded_size(config: StudyConfig, record: RunRecord, say: Say) -> dict[str, Any] | None:
    """The probe this run folder made before, when it holds for ``config``."""
    key, was = probe_key(config), record.get("size_probe")
    if isinstance(was, dict) and {k: was.get(k) for k in key} == key and was.get("chosen"):
        say(f"image size {was['chosen']} px: chosen by this run's size probe before")
        return was
    return None


def with_size(config: StudyConfig, probe: dict[str, Any]) -> StudyConfig:
    return replace(config, data=replace(config.data, image_size=int(probe["chosen"])))


def choose_size(
    config: StudyConfig, p: Placement, seconds: float | None, say: Say
) -> dict[str, Any]:
    """Probe the candidate sizes (at most ``seconds``); the record of the choice."""
    from tlopt.devices import pick_device
    from tlopt.models.backbones import create_backbone
    from tlopt.tune.context import cache_dir, open_config_source
    from tlopt.tune.size_probe import (
        candidate_sizes,
        choose,
        median_side,
        native_size,
        probe_sizes,
        probe_table,
    )

    began = time.monotonic()
    source = open_config_source(config)
    native = native_size(create_backbone(config.model.backbone, "none", len(source.classes)))
    sizes = candidate_sizes(native, median_side(source))
    say(f"size probe: {', '.join(map(str, sizes))} px (the backbone's own is {native})")
    device = pick_device(p.plan_device)
    rows = probe_sizes(config, source, sizes, cache_dir(), device, seconds, say)
    chosen = choose(rows)
    table = probe_table(rows, chosen)
    for line in table:
        say(line)
    say(f"size probe: {time.monotonic() - began:.0f} s in all")
    return probe_key(config) | {
        "chosen": chosen,
        "rows": [r.as_dict() for r in rows],
        "table": table,
    }
